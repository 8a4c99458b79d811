"""ONNX export with the custom ``ai.gn_convert::GroupNorm`` op, and its lowering passes.

- :func:`export_onnx`: a GroupNorm model -> one ``.onnx`` file in one of the
  :data:`~gn_convert.onnx.targets.TARGETS` forms, checked and written atomically.
- :func:`lower_onnx`: another form of an exported ``function`` file, without tracing again.
- :func:`read_model`, :func:`groupnorm_layers`: reading a file back.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:  # PEP 562
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
