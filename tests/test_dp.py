"""DP-ready conversion: Opacus validates the model and trains it with DP-SGD as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import gn_convert
from gn_convert.errors import UnsupportableLayerError
from gn_convert.surgery.dp import check_dp_ready, make_dp_ready

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
    with pytest.raises(UnsupportableLayerError, match="BackwardHookFunction is a view"):
        check_dp_ready(plain, torch.randn(2, 3, SIZE, SIZE))
    with pytest.raises(RuntimeError, match="BackwardHookFunction"):
        dp_epoch(plain)
    check_dp_ready(make_dp_ready(plain), torch.randn(2, 3, SIZE, SIZE))


def test_opacus_fix_path_fails_where_dp_ready_trains() -> None:
    fixed = ModuleValidator.fix(torchvision.models.resnet18(num_classes=10)).train()
    with pytest.raises(RuntimeError, match="BackwardHookFunction"):
        dp_epoch(fixed)


def test_dp_ready_refuses_batchnorm_left_and_training_dependent_inplace_code() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(UnsupportableLayerError, match=r"1 BatchNorm layer\(s\) remain \(3\)"):
        gn_convert.convert(model, 4, exclude=["3"], dp_ready=True)

    class Moody(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            if self.training:
                y += 1
            return y

    with pytest.raises(UnsupportableLayerError, match=r"make 0 \(Moody\) DP-ready.*depends on training mode"):
        make_dp_ready(nn.Sequential(Moody(), nn.GroupNorm(1, 3)))


def test_rewritten_blocks_keep_names_and_unused_members() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm, self.unused = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Linear(2, 2)
            self.register_buffer("scale", torch.tensor(2.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.norm(self.conv(x))
            out += x
            return out.relu_()

    model = nn.Sequential(Block(), Block())
    keys = list(model.state_dict())
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        expected = model(x.clone())
    ready = make_dp_ready(model)
    assert type(ready[0]).__name__ == "Block" and isinstance(ready[0], torch.fx.GraphModule)
    assert sorted(ready.state_dict()) == sorted(keys)
    with torch.no_grad():
        assert float((ready(x) - expected).abs().max()) < 1e-6
    check_dp_ready(ready, x)


def test_cli_dp_ready_checkpoint_comes_back_dp_ready(tmp_path: Path) -> None:
    from gn_convert.cli import main

    out = tmp_path / "gn"
    assert main(["resnet18", "--weights", "none", "--groups", "8", "--dp-ready", "--no-onnx", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dp_ready"] is True
    model = gn_convert.load_converted(out)
    assert model.training and not model.relu.inplace
    assert ModuleValidator.validate(model, strict=False) == []
    loss, change = dp_epoch(model)
    assert change > 1e-4
