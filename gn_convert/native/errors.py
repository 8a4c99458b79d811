"""Exception type of the native kernel."""

from __future__ import annotations

from ..errors import GnConvertError


class NativeBuildError(GnConvertError):
    """The native kernel library cannot be built or loaded here (one line: what and what to do)."""
