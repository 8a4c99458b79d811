"""Parity: prove that an ONNX model computes what its PyTorch model computes.

:func:`check_parity` runs the ONNX file under every requested onnxruntime provider (CPU
always; CUDA and TensorRT where present, otherwise reported as skipped with the reason), with
graph optimisations off and fully on, on random, hard (large mean, large scale) and optional
real-image inputs at two batch sizes; checks that samples do not interact within a batch; and
names the first GroupNorm layer whose output departs when a provider fails. Tolerances per
provider and dtype are documented in :mod:`gn_convert.parity.tolerances`.
"""

from __future__ import annotations

from gn_convert.errors import ParityError
from gn_convert.parity.check import DEFAULT_BATCH, check_parity
from gn_convert.parity.localise import LayerError, Localisation
from gn_convert.parity.metrics import Metrics, compare
from gn_convert.parity.report import InvarianceResult, ParityReport, ParityRow
from gn_convert.parity.tolerances import DEFAULT_TOLERANCES, HARD_INPUT_FACTOR, Tolerance

__all__ = ["DEFAULT_BATCH", "DEFAULT_TOLERANCES", "HARD_INPUT_FACTOR", "InvarianceResult", "LayerError",
           "Localisation", "Metrics", "ParityError", "ParityReport", "ParityRow", "Tolerance", "check_parity",
           "compare"]
