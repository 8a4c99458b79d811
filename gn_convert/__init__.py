"""gn-convert: turn pretrained BatchNorm CNNs into working GroupNorm networks.

The public API, one stage per subpackage, each name imported on first use (so that
``import gn_convert`` stays cheap and never imports onnx or onnxruntime):

- load: :func:`load_model`, :func:`list_models` (``gn_convert.load``)
- surgery: :func:`plan`, :class:`GroupPlan`, :func:`convert`, :func:`save`,
  :func:`load_converted` (``gn_convert.surgery``)
- fidelity: :func:`recover` (the whole job in a time budget), and its building blocks
  :func:`calibrate`, :func:`distill`, :func:`synthesize` (``gn_convert.fidelity``)
- export: :func:`export_onnx`, :class:`ExportReport` (``gn_convert.onnx``)
- parity: :func:`check_parity`, :class:`ParityReport` (``gn_convert.parity``)
- deploy: :func:`write_triton_repo`, :class:`TritonModelServer` (``gn_convert.deploy``)
- the main command as a function: :func:`run_pipeline` (``gn_convert.pipeline``)
"""

from __future__ import annotations

from gn_convert._lazy import lazy_exports
from gn_convert._version import __version__
from gn_convert.errors import GnConvertError, InputError

#: public name -> the module that defines it
_LAZY: dict[str, str] = {
    "load_model": "gn_convert.load.weights",
    "list_models": "gn_convert.load.names",
    "plan": "gn_convert.surgery.plan",
    "GroupPlan": "gn_convert.surgery.plan",
    "LayerPlan": "gn_convert.surgery.plan",
    "choose_groups": "gn_convert.surgery.plan",
    "convert": "gn_convert.surgery.replace",
    "save": "gn_convert.surgery.checkpoint",
    "load_converted": "gn_convert.surgery.checkpoint",
    "calibrate": "gn_convert.fidelity.calibrate.engine",
    "CalibrationReport": "gn_convert.fidelity.calibrate.engine",
    "distill": "gn_convert.fidelity.distill.engine",
    "DistillResult": "gn_convert.fidelity.distill.options",
    "recover": "gn_convert.fidelity.recover.engine",
    "RecoveryResult": "gn_convert.fidelity.recover.engine",
    "synthesize": "gn_convert.fidelity.synthesize.engine",
    "export_onnx": "gn_convert.onnx.export",
    "ExportReport": "gn_convert.onnx.export",
    "check_parity": "gn_convert.parity.check",
    "ParityReport": "gn_convert.parity.report",
    "write_triton_repo": "gn_convert.deploy.triton_repo",
    "TritonModelServer": "gn_convert.deploy.server",
    "run_pipeline": "gn_convert.pipeline",
    "PipelineOptions": "gn_convert.pipeline",
}

__all__ = ["__version__", "GnConvertError", "InputError", *_LAZY]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
