"""Clips made from photos for video recovery (gn_convert.tasks.video): still clips repeat the view; moving clips
pan and zoom a window that stays inside the view, seeded, fresh at every training fetch."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from gn_convert.tasks.video import SCALE, Clips, moving, still


def test_a_still_clip_repeats_its_image() -> None:
    images = torch.rand(2, 3, 8, 8)
    clips = still(images, 16)
    assert clips.shape == (2, 3, 16, 8, 8) and all(torch.equal(clips[:, :, t], images) for t in range(16))


def test_a_moving_clip_moves_stays_inside_the_view_and_is_seeded() -> None:
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    clips = moving(images, 16, torch.Generator().manual_seed(1))
    assert clips.shape == (4, 3, 16, 32, 32)
    assert torch.equal(clips, moving(images, 16, torch.Generator().manual_seed(1)))
    assert not torch.equal(clips, moving(images, 16, torch.Generator().manual_seed(2)))
    steps = (clips[:, :, 1:] - clips[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # (N, T-1)
    assert float(steps.min()) > 1e-3  # every clip moves between every pair of frames
    ring = torch.zeros(2, 3, 32, 32)
    ring[..., 0, :] = ring[..., -1, :] = ring[..., :, 0] = ring[..., :, -1] = 1.0  # the view's outermost pixels
    assert float(moving(ring, 16, torch.Generator().manual_seed(3)).max()) == 0.0  # never sampled
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert float((moving(flat, 16) - 0.3).abs().max()) < 1e-6


def test_a_moving_clip_at_mid_course_is_the_centre_window() -> None:
    """With an odd frame count the middle frame is the centred window of side SCALE: no travel, no zoom yet."""
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    middle = moving(images, 17, torch.Generator().manual_seed(4))[:, :, 8]
    theta = torch.tensor([[[SCALE, 0.0, 0.0], [0.0, SCALE, 0.0]]])
    grid = F.affine_grid(theta, [1, 3, 64, 64], align_corners=False)
    expected = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert float((middle - expected).abs().max()) < 1e-5


def test_training_clips_move_afresh_at_every_fetch() -> None:
    items = [(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(k)), k) for k in range(2)]
    clips = Clips(items, 8, motion=True)  # type: ignore[arg-type] # a list of items serves as a Dataset
    first, again = clips[0][0], clips[0][0]
    assert first.shape == (3, 8, 16, 16) and clips[1][1] == 1 and not torch.equal(first, again)
    assert torch.equal(Clips(items, 8)[0][0], still(items[0][0].unsqueeze(0), 8)[0])  # type: ignore[arg-type]
