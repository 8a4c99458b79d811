"""Exception type of the parity stage."""

from __future__ import annotations

from ..errors import GnConvertError


class ParityError(GnConvertError):
    """The parity check cannot run: the ONNX file does not match the model, or a bad option.

    A check that runs and finds a mismatch is not an error: it is a failed
    :class:`~gn_convert.parity.ParityReport`.
    """
