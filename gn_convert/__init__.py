"""gn-convert: turn pretrained BatchNorm CNNs into working GroupNorm networks.

The public API, one stage per module:

- :func:`load_model`, :func:`list_models` (``gn_convert.models``)
- :func:`plan`, :class:`GroupPlan` (``gn_convert.group_plan``)
- :func:`convert` (``gn_convert.surgery``)
- :func:`save`, :func:`load_converted` (``gn_convert.checkpoint``)
- :func:`calibrate` (``gn_convert.calibrate``), :func:`distill` (``gn_convert.finetune``)
- :func:`export_onnx`, :class:`ExportReport` (``gn_convert.onnx``; imported on first use)
- :func:`check_parity`, :class:`ParityReport` (``gn_convert.parity``; imported on first use)
- :func:`write_triton_repo`, :class:`TritonModelServer` (``gn_convert.deploy``; imported on first use)
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import GnConvertError  # noqa: E402
from .group_plan import GroupPlan, LayerPlan, choose_groups, plan  # noqa: E402
from .surgery import convert  # noqa: E402
from .models import list_models, load_model  # noqa: E402
from .checkpoint import load_converted, save  # noqa: E402
from .calibrate import calibrate  # noqa: E402  (the function shadows the module attribute)
from .finetune import DistillResult, distill  # noqa: E402

__all__ = [
    "__version__",
    "DistillResult",
    "GnConvertError",
    "GroupPlan",
    "LayerPlan",
    "calibrate",
    "choose_groups",
    "convert",
    "distill",
    "list_models",
    "load_converted",
    "load_model",
    "plan",
    "save",
    "export_onnx",
    "ExportReport",
    "check_parity",
    "ParityReport",
    "write_triton_repo",
    "TritonModelServer",
]

#: public names imported on first use (onnx, onnxscript and torch.onnx take about a second)
_LAZY = {"export_onnx": ".onnx", "ExportReport": ".onnx", "check_parity": ".parity", "ParityReport": ".parity",
         "write_triton_repo": ".deploy", "TritonModelServer": ".deploy"}


def __getattr__(name: str):  # noqa: ANN202 (PEP 562 module attribute)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
