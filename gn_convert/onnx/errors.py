"""Exception type of the ONNX export stage."""

from __future__ import annotations

from ..errors import GnConvertError


class ExportError(GnConvertError):
    """The model cannot be exported, or the written artifact failed its checks.

    The message is one line that says what is wrong and what to do.
    """


class OnnxFileError(GnConvertError):
    """A file given as an ONNX model is missing, unreadable or not ONNX."""
