"""``scripts/dp_transfer.py``: its fast mode (digits, epsilon 3, 2 seeds, about 35 s) and what it measures.

The fast mode builds the four starting points of a ResNet-18 pretrained on digits 0-4 and
DP-fine-tunes each on digits 5-9 at epsilon 3 with two seeds. The slow test asserts the
measured numbers: every run finished, gn-convert's conversion (c) beats Opacus's
``ModuleValidator.fix`` (a) by at least 10 points on average and in each seed, and (c) is far
above chance. The quick tests check the study's pieces (BatchNorm folding, which parameters
DP-SGD trains).
"""

from __future__ import annotations

import math
import sys
from types import ModuleType

import pytest
import torch
import torchvision
from torch import nn

from helpers.scripts import load_script

pytest.importorskip("opacus", reason="opacus is not installed (pip install -e '.[dp]')")


@pytest.fixture(scope="module")
def study_module() -> ModuleType:
    pytest.importorskip("sklearn", reason="the digits task needs scikit-learn")
    try:
        yield load_script("dp_transfer")
    finally:
        for name in ("dp_transfer", "dp_transfer_tasks", "dp_transfer_report"):
            sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def fast(study_module: ModuleType):
    return study_module.main(["--fast"])


@pytest.mark.slow
def test_fast_mode_runs_every_start_and_seed(study_module: ModuleType, fast) -> None:
    runs = fast.runs
    keys = sorted((r.start, r.seed) for r in runs)
    assert keys == sorted((s, seed) for s in study_module.STARTS for seed in (0, 1))
    assert all(r.network == "digits" and r.epsilon == 3.0 for r in runs)
    assert all(0.0 <= r.accuracy <= 100.0 and r.seconds > 0 for r in runs)
    sigmas = {r.noise_multiplier for r in runs}
    assert len(sigmas) == 1 and sigmas.pop() > 0.5  # the same noise for every start: same hyper-parameters
    assert all(r.epsilon_spent <= 3.0 * 1.01 for r in runs)
    starts = fast.networks["digits"]["starts"]
    assert starts["fold"]["fold_max_error"] < 1e-4
    assert starts["fix"]["fix_alone"].startswith("fails") and "BackwardHookFunction" in starts["fix"]["fix_alone"]
    assert not math.isnan(starts["recover"]["heldout_agreement"])


@pytest.mark.slow
def test_fast_mode_convert_beats_opacus_fix_at_epsilon_3(study_module: ModuleType, fast) -> None:
    chance = fast.networks["digits"]["chance"]
    assert chance == 20.0
    assert study_module.gap(fast.summary, "digits", 3.0) >= 10.0  # the target, on the means
    by = {(r.start, r.seed): r.accuracy for r in fast.runs}
    for seed in (0, 1):
        assert by[("convert", seed)] >= by[("fix", seed)] + 10.0
        assert by[("convert", seed)] >= chance + 30.0
        assert by[("recover", seed)] >= chance + 30.0
    row = next(r for r in fast.summary if r["start"] == "convert")
    assert row["accuracy_mean"] == pytest.approx(sum(by[("convert", s)] for s in (0, 1)) / 2)
    assert "| digits | (c) gn-convert | 3 |" in study_module.table(fast.summary)


def _with_statistics(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.3)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
    return model.eval()


def test_folding_removes_every_batchnorm_and_keeps_the_function(study_module: ModuleType) -> None:
    tasks = sys.modules["dp_transfer_tasks"]
    model = _with_statistics(torchvision.models.resnet18(num_classes=5))
    x = torch.randn(2, 3, 32, 32)
    folded, error = tasks.fold_batchnorm(model, x)
    assert error < 1e-4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the input is not changed
    with torch.no_grad():
        assert float((folded(x) - model(x)).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="not a convolution's output"):
        tasks.fold_batchnorm(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)).eval(), x)


def test_dp_trains_only_the_tails_norm_layers(study_module: ModuleType) -> None:
    tail = nn.Sequential(nn.Conv2d(4, 8, 3, bias=True), nn.GroupNorm(2, 8), nn.ReLU())
    params = study_module.trainable_parameters(tail)
    assert params == [tail[1].weight, tail[1].bias]
    assert not tail[0].weight.requires_grad and not tail[0].bias.requires_grad
    assert study_module.trainable_parameters(nn.Sequential(nn.Conv2d(4, 8, 3), nn.Identity())) == []
