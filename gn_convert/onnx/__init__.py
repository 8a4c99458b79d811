"""ONNX export with the custom ``ai.gn_convert::GroupNorm`` op, and its lowering passes.

- :func:`export_onnx`: a GroupNorm model -> one ``.onnx`` file in one of the
  :data:`~gn_convert.onnx.targets.TARGETS` forms, checked and written atomically.
- :func:`lower_onnx`: another form of an exported ``function`` file, without tracing again.
- :func:`read_model`, :func:`groupnorm_layers`: reading a file back.
"""

from __future__ import annotations

from gn_convert.onnx.export import ExportReport, export_onnx, lower_onnx
from gn_convert.onnx.reading import groupnorm_layers, read_model
from gn_convert.onnx.targets import TARGETS

__all__ = ["TARGETS", "ExportReport", "export_onnx", "groupnorm_layers", "lower_onnx", "read_model"]
