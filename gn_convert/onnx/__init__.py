"""ONNX export with the custom ``ai.gn_convert::GroupNorm`` op, and its lowering passes.

- :func:`export_onnx`: a GroupNorm model -> one ``.onnx`` file (``function``, ``inlined`` or
  ``standard`` form), checked and written atomically.
- :func:`lower_onnx`: another form of an exported ``function`` file, without tracing again.
"""

from __future__ import annotations

from .errors import ExportError, OnnxFileError
from .export import TARGETS, ExportReport, export_onnx, lower_onnx
from .reading import groupnorm_layers, read_model

__all__ = ["TARGETS", "ExportError", "ExportReport", "OnnxFileError", "export_onnx", "groupnorm_layers",
           "lower_onnx", "read_model"]
