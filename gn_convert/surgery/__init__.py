"""Surgery: which GroupNorm replaces each BatchNorm layer, its initialisation, the replacement
itself, and saving the result.

- :mod:`~gn_convert.surgery.registry`: BatchNorm types, readers of their state, builders of their
  replacement (timm's norm + activation layers keep their activation).
- :mod:`~gn_convert.surgery.plan`: :func:`plan` -> :class:`GroupPlan`.
- :mod:`~gn_convert.surgery.initialize`: data-free affine inits (``INITS``).
- :mod:`~gn_convert.surgery.replace`: :func:`convert`.
- :mod:`~gn_convert.surgery.checkpoint`: :func:`save`, :func:`load_converted`.
"""

from __future__ import annotations

from gn_convert.surgery.plan import GroupPlan, LayerPlan, batchnorm_layers, choose_groups, plan
from gn_convert.surgery.registry import (
                                         BatchNormState,
                                         is_batchnorm,
                                         read_batchnorm,
                                         register_batchnorm,
                                         register_replacement,
)
from gn_convert.surgery.replace import convert

__all__ = ["BatchNormState", "GroupPlan", "LayerPlan", "batchnorm_layers", "choose_groups", "convert",
           "is_batchnorm", "plan", "read_batchnorm", "register_batchnorm", "register_replacement"]
