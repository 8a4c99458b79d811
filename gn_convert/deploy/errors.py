"""Exception types of the deploy stage (Triton repository and serving)."""

from __future__ import annotations

from ..errors import GnConvertError


class DeployError(GnConvertError):
    """A model cannot be deployed as asked (its inputs do not fit Triton, a bad option...).

    The message is one line that says what is wrong and what to do.
    """


class ServeExtraMissingError(DeployError):
    """The optional ``serve`` dependencies (nvidia-pytriton, tritonclient) are not installed."""


class ServerError(DeployError):
    """The inference server did not start, or stopped unexpectedly."""
