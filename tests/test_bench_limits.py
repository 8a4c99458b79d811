"""The physical limit of the latency harness: GroupNorm activation bytes and copy bandwidth."""

from __future__ import annotations

import math

import torch
from torch import nn

from gn_convert.bench.limits import floor_ms, groupnorm_traffic, memory_bandwidth


def test_traffic_counts_every_groupnorm_call_and_its_bytes() -> None:
    norm = nn.GroupNorm(4, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                          nn.GroupNorm(2, 8), norm)  # the shared layer runs twice
    traffic = groupnorm_traffic(model, (2, 3, 16, 16))
    assert traffic.layers == 3
    assert traffic.activation_bytes == 4 * (2 * 8 * 16 * 16 + 2 * 2 * 8 * 8 * 8)
    assert traffic.minimum_bytes == 2 * traffic.activation_bytes and traffic.two_pass_bytes == 3 * traffic.activation_bytes
    half = groupnorm_traffic(model, (2, 3, 16, 16), dtype=torch.float16)
    assert half.activation_bytes * 2 == traffic.activation_bytes
    assert model.training  # the mode is restored


def test_bandwidth_and_floor() -> None:
    bandwidth = memory_bandwidth(threads=1, megabytes=32, repeats=2)
    assert math.isfinite(bandwidth) and 1e8 < bandwidth < 1e13  # between 0.1 GB/s and 10 TB/s
    assert floor_ms(2_000_000_000, 1e10) == 200.0
