"""DP-ready conversion: Opacus validates the model and trains it with DP-SGD as it is."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import gn_convert
from gn_convert.errors import UnsupportableLayerError
from gn_convert.surgery.dp import check_dp_ready, is_dp_ready, make_dp_ready

opacus = pytest.importorskip("opacus", reason="opacus is not installed (pip install -e '.[dp]')")
from opacus import PrivacyEngine  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402

SIZE = 32


def dp_epoch(model: nn.Module, seed: int = 0) -> tuple[float, float]:
    """One DP-SGD epoch (2 batches of 8) under ``PrivacyEngine.make_private``; (last loss, largest weight change)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 3, SIZE, SIZE, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    private, optimizer, loader = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                              noise_multiplier=1.0, max_grad_norm=1.0)
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(private(xb), yb)
        loss.backward()
        optimizer.step()
    after = private._module.state_dict()
    return float(loss.detach()), max(float((after[k] - v).abs().max()) for k, v in before.items() if v.is_floating_point())


def builders() -> dict[str, callable]:
    timm = pytest.importorskip("timm")
    return {
        "torchvision-resnet18": lambda: torchvision.models.resnet18(num_classes=10),
        "torchvision-mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        "timm-resnet18": lambda: timm.create_model("resnet18", num_classes=10),
        "timm-mobilenetv3_small_050": lambda: timm.create_model("mobilenetv3_small_050", num_classes=10),
    }


@pytest.mark.parametrize("name", ["torchvision-resnet18", "torchvision-mobilenet_v3_small", "timm-resnet18",
                                  "timm-mobilenetv3_small_050"])
def test_dp_ready_model_validates_and_trains_under_opacus(name: str) -> None:
    torch.manual_seed(0)
    teacher = builders()[name]().eval()
    plain = gn_convert.convert(teacher, 8)
    ready = gn_convert.convert(teacher, 8, dp_ready=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert float((ready.eval()(x) - plain.eval()(x)).abs().max()) == 0.0  # the same function
    assert plain.state_dict().keys() == ready.state_dict().keys()
    assert ModuleValidator.validate(ready.train(), strict=False) == []
    loss, change = dp_epoch(ready)
    assert 0 < loss < 20 and change > 1e-4


def test_without_dp_ready_the_first_dp_step_fails_as_opacus_reports() -> None:
    plain = gn_convert.convert(torchvision.models.resnet18(num_classes=10).eval(), 8).train()
    assert ModuleValidator.validate(plain, strict=False) == []  # validation passes, training does not
    with pytest.raises(UnsupportableLayerError, match=r"BackwardHookFunction is a view.* \(in relu\)"):
        check_dp_ready(plain, torch.randn(2, 3, SIZE, SIZE))
    ready = make_dp_ready(copy.deepcopy(plain))
    with pytest.raises(RuntimeError, match="BackwardHookFunction"):
        dp_epoch(plain)
    check_dp_ready(ready, torch.randn(2, 3, SIZE, SIZE))


def test_opacus_fix_path_fails_where_dp_ready_trains() -> None:
    fixed = ModuleValidator.fix(torchvision.models.resnet18(num_classes=10)).train()
    with pytest.raises(RuntimeError, match="BackwardHookFunction"):
        dp_epoch(fixed)


def test_dp_ready_refuses_batchnorm_left_and_training_dependent_inplace_code() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(UnsupportableLayerError, match=r"1 BatchNorm layer\(s\) remain \(3\)"):
        gn_convert.convert(model, 4, exclude=["3"], dp_ready=True)

    class Moody(nn.Module):
        """Modifies its own hooked input in place, in training mode only: a rewrite would freeze the mode."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.training:
                x += 1
            return x * self.weight

    with pytest.raises(UnsupportableLayerError, match=r"make 1 \(Moody\) DP-ready.*depends on training mode"):
        make_dp_ready(nn.Sequential(nn.Conv2d(3, 3, 1), Moody()))


def test_torchvision_resnet_keeps_types_hooks_attributes_flags_and_keys() -> None:
    """The old rewrite replaced each BasicBlock by a GraphModule: types, hooks and attributes were lost."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    model = gn_convert.convert(torchvision.models.resnet18(num_classes=10).eval(), 8)
    model.layer1[0].add_module("unused", nn.ModuleList([nn.Conv2d(2, 2, 1) for _ in range(3)]))
    seen: list[int] = []
    model.layer2[0].register_forward_hook(lambda *_: seen.append(1))
    keys, reference = list(model.state_dict()), copy.deepcopy(model)
    x = torch.randn(2, 3, SIZE, SIZE)
    ready = make_dp_ready(model, x)
    assert ready is model and type(ready.layer2[0]) is BasicBlock and ready.layer2[0].stride == 2
    assert ready.relu.inplace and ready.layer1[0].relu.inplace  # no flag is switched off
    assert list(ready.state_dict()) == keys and "layer1.0.unused.2.weight" in keys
    for training in (True, False):
        with torch.no_grad():
            assert torch.equal(ready.train(training)(x), reference.train(training)(x))
    assert seen
    check_dp_ready(ready, x)


def test_cli_dp_ready_checkpoint_comes_back_dp_ready(tmp_path: Path) -> None:
    from gn_convert.cli import main

    out = tmp_path / "gn"
    assert main(["resnet18", "--weights", "none", "--groups", "8", "--dp-ready", "--no-onnx", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dp_ready"] is True
    model = gn_convert.load_converted(out)
    assert model.training and is_dp_ready(model)
    assert ModuleValidator.validate(model, strict=False) == []
    loss, change = dp_epoch(model)
    assert change > 1e-4


DP_FAMILIES = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "densenet121",
               "shufflenet_v2_x0_5", "googlenet", "timm/resnet18", "timm/mobilenetv3_small_050",
               "timm/cspresnet50", "timm/ghostnet_100", "timm/dla34")
"""One model per family of the catalog (scripts/dp_catalog.py runs them all: models/DP_CATALOG.md)."""


@pytest.mark.slow
@pytest.mark.parametrize("name", DP_FAMILIES)
def test_catalog_family_is_exact_in_outputs_and_gradients_and_takes_a_dp_step(name: str) -> None:
    from gn_convert.testing.dp_row import dp_row

    pytest.importorskip("timm") if name.startswith("timm/") else None
    row = dp_row(name)
    assert "refused" not in row and "error" not in row, row
    assert row["outputs"] == 0.0 and row["gradients"] == 0.0 and row["rewrites"] == []
    assert row["dp_step_change"] > 1e-4
