"""Fidelity: bringing a converted network back to the function of its BatchNorm original.

- :mod:`~gn_convert.fidelity.recover`: :func:`recover`, the whole job in one budgeted call.
- :mod:`~gn_convert.fidelity.group_search`: the fidelity-aware group plan (``policy="fidelity"``).
- :mod:`~gn_convert.fidelity.blocks`, :mod:`~gn_convert.fidelity.reconstruct`: block-wise reconstruction.
- :mod:`~gn_convert.fidelity.synthesize`: images synthesised from the BatchNorm statistics.
- :mod:`~gn_convert.fidelity.pairs`: student/teacher layer pairs and activation capture.
- :mod:`~gn_convert.fidelity.moments`: per-channel sufficient statistics and affine fits.
- :mod:`~gn_convert.fidelity.calibration`, :mod:`~gn_convert.fidelity.greedy`: :func:`calibrate`.
- :mod:`~gn_convert.fidelity.losses`: distillation losses.
- :mod:`~gn_convert.fidelity.distillation`: :func:`distill`, with its options, training state
  and data-parallel helpers (:mod:`~gn_convert.fidelity.options`,
  :mod:`~gn_convert.fidelity.train_state`, :mod:`~gn_convert.fidelity.distributed`).
- :mod:`~gn_convert.fidelity.metrics`: agreement with bootstrap intervals, statistics spread.
- :mod:`~gn_convert.fidelity.stage`: the main command's calibrate-then-distil stage.
"""

from __future__ import annotations

from gn_convert.fidelity.calibration import CalibrationReport, calibrate
from gn_convert.fidelity.distillation import distill
from gn_convert.fidelity.options import DistillResult
from gn_convert.fidelity.pairs import NormPair, norm_pairs
from gn_convert.fidelity.recover import RecoveryResult, recover

__all__ = ["CalibrationReport", "DistillResult", "NormPair", "RecoveryResult", "calibrate", "distill",
           "norm_pairs", "recover"]
