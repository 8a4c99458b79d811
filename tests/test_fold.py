"""Folding BatchNorm into the convolution before it (gn_convert.surgery.fold): exact, recorded in
the plan, refused by name where it cannot be exact, valid under Opacus's validator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import gn_convert
from gn_convert.errors import UnsupportableLayerError
from gn_convert.surgery.fold import feeders, fold_batchnorm
from gn_convert.testing.bn_stats import randomize_batchnorm_affine


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = randomize_batchnorm_affine(torchvision.models.resnet18(num_classes=10), seed=3)
    for m in model.modules():  # running statistics far from (0, 1), so a wrong fold shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model.eval()


def test_folded_stages_are_exact_and_the_rest_converts() -> None:
    model = resnet18()
    x = torch.randn(2, 3, 64, 64)
    folded = gn_convert.convert(model, 8, fold=["bn1", "layer1.*", "layer2.*"], example_input=x)
    plan = gn_convert.plan(model, 8, fold=["bn1", "layer1.*", "layer2.*"])
    assert len(plan.folded) == 1 + 4 + 5 and len(plan.converted) == 20 - 10
    assert "10 folded into their convolutions" in plan.summary()
    assert isinstance(folded.bn1, nn.Identity) and folded.conv1.bias is not None
    assert isinstance(folded.layer3[0].bn1, nn.GroupNorm)
    only_folded = gn_convert.convert(model, 8, fold=["*"], example_input=x)
    with torch.no_grad():
        expected, got = model(x), only_folded.eval()(x)
    assert float((expected - got).abs().max() / expected.abs().max()) < 1e-5  # exact to float rounding
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in only_folded.modules())


def test_a_layer_without_a_convolution_feeding_it_is_refused_by_name() -> None:
    class Summed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.a(x) + self.b(x))

    model = Summed().eval()
    with pytest.raises(UnsupportableLayerError, match="cannot fold bn: its input is not the output of a convolution"):
        gn_convert.convert(model, 2, fold=["bn"], example_input=torch.randn(2, 3, 8, 8))


def test_a_convolution_read_elsewhere_too_is_refused() -> None:
    class Tapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            with torch.no_grad():
                self.bn.running_mean.fill_(0.7)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y  # y is read by the residual too

    with pytest.raises(UnsupportableLayerError, match="changed the model's output .* read elsewhere"):
        fold_batchnorm(Tapped().eval(), ["bn"], torch.randn(2, 3, 8, 8))


class TappedOutputs(nn.Module):
    """The convolution's raw output returned as well: as the second element of a tuple, or under a dict key."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.as_dict = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), as_dict
        with torch.no_grad():
            self.bn.running_mean.fill_(0.7)

    def forward(self, x: torch.Tensor) -> object:
        y = self.conv(x)
        z = self.bn(y)
        return {"main": z, "tap": y} if self.as_dict else (z, y)


@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_a_change_to_any_output_of_a_structured_output_is_refused(as_dict: bool) -> None:
    """The old check read only ``x[0]``: a KeyError on dict outputs, blind to a tuple's second element."""
    with pytest.raises(UnsupportableLayerError, match="changed the model's output .* read elsewhere"):
        fold_batchnorm(TappedOutputs(as_dict).eval(), ["bn"], torch.randn(2, 3, 8, 8))


def test_feeders_are_found_by_one_forward_pass() -> None:
    model = resnet18()
    found = feeders(model, ["bn1", "layer1.0.bn2", "layer2.0.downsample.1"], torch.randn(1, 3, 32, 32))
    assert found == {"bn1": "conv1", "layer1.0.bn2": "layer1.0.conv2", "layer2.0.downsample.1": "layer2.0.downsample.0"}


def test_folded_checkpoint_round_trips_and_opacus_validates_it(tmp_path: Path) -> None:
    model = resnet18()
    x = torch.randn(2, 3, 64, 64)
    gn = gn_convert.convert(model, 8, fold=["bn1", "layer1.*"], example_input=x)
    plan = gn_convert.plan(model, 8, fold=["bn1", "layer1.*"])
    gn_convert.save(gn, tmp_path / "ckpt", plan=plan, architecture="resnet18", model_kwargs={"num_classes": 10})
    again = gn_convert.load_converted(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(again(x), gn.eval()(x))
    opacus = pytest.importorskip("opacus", reason="opacus is not installed (pip install -e '.[dp]')")
    assert opacus.validators.ModuleValidator.validate(gn_convert.convert(model, 8, fold=["layer1.*"], dp_ready=True,
                                                                          example_input=x), strict=False) == []


def test_cli_fold_is_recorded_in_the_plan(tmp_path: Path) -> None:
    import json

    from gn_convert.cli import main

    out = tmp_path / "gn"
    assert main(["resnet18", "--weights", "none", "--fold", "layer1.*", "--no-onnx", "--out", str(out)]) == 0
    layers = json.loads((out / "config.json").read_text())["plan"]["layers"]
    assert [layer["name"] for layer in layers if layer["action"] == "fold"] == \
        ["layer1.0.bn1", "layer1.0.bn2", "layer1.1.bn1", "layer1.1.bn2"]
