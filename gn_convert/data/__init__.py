"""Data: the model's preprocessing, image folders, the item format, and seeded splits.

- :mod:`~gn_convert.data.transforms`: :func:`model_transforms` (evaluation and training).
- :mod:`~gn_convert.data.folders`: :func:`scan_folder`, :class:`ImageFiles`.
- :mod:`~gn_convert.data.items`: ``(image, label)`` items, :func:`split_batch`.
- :mod:`~gn_convert.data.sources`: :func:`load_data` -> :class:`DataSplit`.
"""

from __future__ import annotations

from gn_convert.data.items import UNLABELLED, as_item, split_batch
from gn_convert.data.sources import DataSplit, load_data, split_indices
from gn_convert.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, model_transforms

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "UNLABELLED", "DataSplit", "Preprocessing", "as_item", "load_data",
           "model_transforms", "split_batch", "split_indices"]
