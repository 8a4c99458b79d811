"""The torch CUDA paths of recovery: distillation with AMP on the GPU, the caller's CPU model left
where and as it was, and the recovered student computing on the GPU what it computes on the CPU.
Skipped, with the reason, where torch sees no CUDA device (onnxruntime's CUDA rows are in
tests/test_parity.py and tests/test_serve.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gn_convert.fidelity.recover.engine import recover
from gn_convert.testing.synthetic import SyntheticImages

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device (needs an NVIDIA GPU)"),
]


def test_recover_on_cuda_distils_with_amp_and_leaves_the_callers_model_on_the_cpu(tiny_teacher) -> None:
    teacher = copy.deepcopy(tiny_teacher)
    with torch.no_grad():
        teacher[-1].weight.mul_(30)  # confident outputs, so that the held-out KL is far from 0
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = SyntheticImages(96, (3, 12, 12), num_classes=5)
    result = recover(teacher, data, budget=20, batch_size=16, groups=16, min_channels_per_group=1, device="cuda")
    assert all(p.device.type == "cpu" for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert next(result.model.parameters()).device.type == "cuda"
    distilled = result.stages[-1]
    assert distilled.name == "distill" and distilled.detail["steps"] >= 10, distilled.detail
    assert math.isfinite(distilled.detail["history"][-1]["train_loss"])
    assert result.scores["kl"] <= result.stages[0].scores["kl"]  # the best state is kept
    images = torch.stack([data[i][0] for i in range(32)])
    with torch.no_grad():
        on_gpu = result.model(images.cuda()).float().cpu()
        on_cpu = copy.deepcopy(result.model).cpu()(images)
    assert float((on_gpu - on_cpu).abs().max() / on_cpu.abs().max()) < 1e-3


def test_make_dp_ready_on_a_gpu_model_proves_on_the_gpu_and_restores_its_random_state() -> None:
    """The old proof built its probe on the CPU and forked only the CPU's random state."""
    import torchvision

    import gn_convert
    from gn_convert.surgery.dp import check_dp_ready, is_dp_ready, make_dp_ready

    torch.manual_seed(0)
    model = gn_convert.convert(torchvision.models.resnet18(num_classes=10).eval(), 8).cuda()
    reference = copy.deepcopy(model)
    torch.cuda.manual_seed(123)
    state = torch.cuda.get_rng_state()
    ready = make_dp_ready(model)
    assert torch.equal(torch.cuda.get_rng_state(), state) and is_dp_ready(ready)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        assert torch.equal(ready.eval()(x), reference.eval()(x))
    check_dp_ready(ready, x)
