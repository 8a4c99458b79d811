"""Fidelity: bringing a converted network back to the function of its BatchNorm original.

- :mod:`~gn_convert.fidelity.recover.engine`: :func:`recover`, the whole job in one budgeted call.
- :mod:`~gn_convert.fidelity.group_search`: the fidelity-aware group plan (``policy="fidelity"``).
- :mod:`~gn_convert.fidelity.blocks`, :mod:`~gn_convert.fidelity.reconstruct.engine`: block-wise reconstruction.
- :mod:`~gn_convert.fidelity.synthesize.engine`: images synthesised from the BatchNorm statistics.
- :mod:`~gn_convert.fidelity.pairs`: student/teacher layer pairs and activation capture.
- :mod:`~gn_convert.fidelity.calibrate.moments`: per-channel sufficient statistics and affine fits.
- :mod:`~gn_convert.fidelity.calibrate.engine`, :mod:`~gn_convert.fidelity.calibrate.greedy`: :func:`calibrate`.
- :mod:`~gn_convert.fidelity.distill.losses`: distillation losses.
- :mod:`~gn_convert.fidelity.distill.engine`: :func:`distill`, with its options, training state
  and data-parallel helpers (:mod:`~gn_convert.fidelity.distill.options`,
  :mod:`~gn_convert.fidelity.distill.state`, :mod:`~gn_convert.fidelity.distributed`).
- :mod:`~gn_convert.fidelity.metrics`: agreement with bootstrap intervals, statistics spread.
- :mod:`~gn_convert.fidelity.stage`: the main command's calibrate-then-distil stage.
"""

from __future__ import annotations

from gn_convert.fidelity.calibrate.engine import CalibrationReport, calibrate
from gn_convert.fidelity.distill.engine import distill
from gn_convert.fidelity.distill.options import DistillResult
from gn_convert.fidelity.pairs import NormPair, norm_pairs
from gn_convert.fidelity.recover.engine import RecoveryResult, recover

__all__ = ["CalibrationReport", "DistillResult", "NormPair", "RecoveryResult", "calibrate", "distill",
           "norm_pairs", "recover"]
