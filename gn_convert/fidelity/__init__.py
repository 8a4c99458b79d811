"""Fidelity: bringing a converted network back to the function of its BatchNorm original.

- :mod:`~gn_convert.fidelity.pairs`: student/teacher layer pairs and activation capture.
- :mod:`~gn_convert.fidelity.moments`: per-channel sufficient statistics and affine fits.
- :mod:`~gn_convert.fidelity.calibration`, :mod:`~gn_convert.fidelity.greedy`: :func:`calibrate`.
- :mod:`~gn_convert.fidelity.losses`: distillation losses.
- :mod:`~gn_convert.fidelity.distillation`: :func:`distill`, with its options, training state
  and data-parallel helpers (:mod:`~gn_convert.fidelity.options`,
  :mod:`~gn_convert.fidelity.train_state`, :mod:`~gn_convert.fidelity.distributed`).
"""

from __future__ import annotations

from gn_convert.fidelity.calibration import CalibrationReport, calibrate
from gn_convert.fidelity.distillation import distill
from gn_convert.fidelity.options import DistillResult
from gn_convert.fidelity.pairs import NormPair, norm_pairs

__all__ = ["CalibrationReport", "DistillResult", "NormPair", "calibrate", "distill", "norm_pairs"]
