"""ONNX export with the custom ``ai.gn_convert::GroupNorm`` op, and its lowering passes.

- :func:`export_onnx`: a GroupNorm model -> one ``.onnx`` file in one of the
  :data:`~gn_convert.onnx.targets.TARGETS` forms, checked and written atomically.
- :func:`lower_onnx`: another form of an exported ``function`` file, without tracing again.
- :func:`read_model`, :func:`groupnorm_layers`: reading a file back.
"""

from __future__ import annotations

from gn_convert._lazy import lazy_exports

#: public name -> the module that defines it; imported on first use, so that the CLI's parser
#: (which reads ``gn_convert.onnx.targets``) does not import onnx and onnxscript
_LAZY: dict[str, str] = {
    "TARGETS": "gn_convert.onnx.targets",
    "ExportReport": "gn_convert.onnx.export",
    "export_onnx": "gn_convert.onnx.export",
    "lower_onnx": "gn_convert.onnx.export",
    "groupnorm_layers": "gn_convert.onnx.reading",
    "read_model": "gn_convert.onnx.reading",
}

__all__ = list(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
