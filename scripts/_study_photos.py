"""The photos a study trains on and scores on: the development pool's splits, or the bundled photos.

``pool`` (the default of the studies): the photo pool's ``train`` photos, and its ``test`` split scored
(``dev`` while tuning; ``scripts/photo_pool.py``, docs/PHOTOS.md). ``bundled`` (a quick look, the tests):
the scikit-image/scikit-learn photos of :data:`gn_convert.testing.photo_sets.TRAIN_PHOTOS` and
:data:`~gn_convert.testing.photo_sets.HELDOUT_PHOTOS`.
"""

from __future__ import annotations

from typing import Any

from gn_convert.testing.photo_sets import HELDOUT_PHOTOS, TRAIN_PHOTOS
from gn_convert.testing.shape_masks import bundled_photos, folder_photos


def study_photos(bundled: bool, eval_split: str = "test") -> tuple[list[Any], list[Any], str]:
    """(training photos, scored photos, a line saying where they come from), as uint8 RGB arrays."""
    if bundled:
        return bundled_photos(TRAIN_PHOTOS), bundled_photos(HELDOUT_PHOTOS), "scikit-image/scikit-learn photos"
    from photo_pool import build_pool

    pool = build_pool()
    train, scored = folder_photos(pool / "train"), folder_photos(pool / eval_split)
    return train, scored, f"photo pool {pool.name}: {len(train)} train, {len(scored)} {eval_split} photos"
