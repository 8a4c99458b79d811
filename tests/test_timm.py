"""timm models: norm + activation layers keep their activation, timm names load, every family
converts, exports and passes parity, and a corrupted norm-act layer is named by parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gn_convert
from gn_convert.errors import UnknownModelError, UnsupportableLayerError, WeightsError, WeightsUnavailableError
from gn_convert.load.weights import resolve_source
from gn_convert.surgery.observe import register_output_hook
from gn_convert.surgery.registry import is_batchnorm
from tests.helpers.models import make_nontrivial

timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, GroupNormAct  # noqa: E402

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.LeakyReLU, nn.GELU, nn.Mish, nn.Hardsigmoid, nn.Sigmoid)
SIZE = 64
#: one model per timm family of the issue: resnet, efficientnet, mobilenetv3, regnet, cspnet
FAMILIES = ("resnet18", "efficientnet_b0", "mobilenetv3_small_050", "regnetx_002", "cspresnet50")


def activations(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in model.modules() if isinstance(m, ACTIVATIONS)]


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100", "cspresnet50"])
def test_norm_act_layers_keep_their_activation(name: str) -> None:
    teacher = timm.create_model(name, pretrained=False).eval()
    student = gn_convert.convert(teacher, 8)
    assert activations(student) == activations(teacher)  # the counts: 49, 33, 51 (16, 10, 13 before)
    originals = dict(teacher.named_modules())
    checked = 0
    for layer_name, layer in student.named_modules():
        if not isinstance(layer, GroupNormAct):
            continue
        original = originals[layer_name]
        assert isinstance(original, BatchNormAct2d) and type(layer.act) is type(original.act)
        assert getattr(layer.act, "inplace", None) == getattr(original.act, "inplace", None)
        x = torch.randn(2, layer.num_channels, 5, 5)
        with torch.no_grad():
            reference = original.act(F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps))
            assert float((layer(x.clone()) - reference).abs().max()) < 1e-6
        checked += 1
    assert checked == sum(isinstance(m, BatchNormAct2d) for m in teacher.modules()) > 10


def test_frozen_norm_act_converts_with_its_statistics() -> None:
    frozen = FrozenBatchNormAct2d(16, act_layer=nn.SiLU)
    with torch.no_grad():
        frozen.running_mean.uniform_(-1, 1)
        frozen.running_var.uniform_(0.5, 2)
        frozen.weight.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), frozen).eval()
    converted = gn_convert.convert(model, 16)  # G = C: per-channel statistics, exact on a constant-per-sample input
    assert isinstance(converted[1], GroupNormAct) and isinstance(converted[1].act, nn.SiLU)
    assert not any(p.requires_grad for p in converted[1].parameters())
    assert not any(is_batchnorm(m) for m in converted.modules())


def test_a_batchnorm_subclass_with_its_own_forward_is_refused_by_name() -> None:
    class Masked(nn.BatchNorm2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 0.5

    model = nn.Sequential(nn.Conv2d(3, 8, 3), Masked(8), nn.Conv2d(8, 8, 3), Masked(8), nn.BatchNorm2d(8))
    with pytest.raises(UnsupportableLayerError, match=r"Masked override.*\(1, 3\)"):
        gn_convert.convert(model, 4)
    converted = gn_convert.convert(model, 4, exclude=["1", "3"])  # excluded layers are not its business
    assert [type(m).__name__ for m in converted] == ["Conv2d", "Masked", "Conv2d", "Masked", "GroupNorm"]


def test_output_hook_sees_the_normalised_output_before_an_inplace_activation() -> None:
    layer = GroupNormAct(8, 4, act_layer=nn.ReLU, inplace=True).eval()
    seen: list[torch.Tensor] = []
    handle = register_output_hook(layer, lambda _m, _i, out: seen.append(out))
    x = torch.randn(2, 8, 4, 4)
    out = layer(x)
    handle.remove()
    expected = F.group_norm(x, 4, layer.weight, layer.bias, layer.eps)
    assert float((seen[0] - expected).abs().max()) < 1e-6 and float(seen[0].min()) < -0.5
    assert float(out.min()) == 0.0
    layer(x)
    assert len(seen) == 1  # removed


def test_timm_names_and_weights() -> None:
    with pytest.raises(UnknownModelError, match="unknown timm model 'resnett18'"):
        gn_convert.load_model("timm/resnett18", "none")
    with pytest.raises(UnknownModelError, match="no pretrained tag 'nope'.*timm/resnet18.a1_in1k"):
        gn_convert.load_model("timm/resnet18.nope", "none")
    with pytest.raises(WeightsError, match="takes weights DEFAULT"):
        gn_convert.load_model("timm/resnet18", "IMAGENET1K_V1")
    source = resolve_source("timm/efficientnet_b0.ra_in1k", "none")
    assert source.input_size == (224, 224)


def test_timm_pretrained_offline_fails_fast_naming_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match=f"not cached under {tmp_path}/models--timm--resnet18.a1_in1k"):
        gn_convert.load_model("timm/resnet18.a1_in1k")


def test_timm_local_weights_file_loads(tmp_path: Path) -> None:
    model = gn_convert.load_model("timm/resnet18", "none")
    torch.save(model.state_dict(), tmp_path / "w.pth")
    loaded = gn_convert.load_model("timm/resnet18", str(tmp_path / "w.pth"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError):
        gn_convert.load_model("timm/resnet18", str(tmp_path / "bad.pth"))


@pytest.mark.parametrize("name", FAMILIES)
def test_timm_family_converts_exports_and_passes_parity(name: str, tmp_path: Path) -> None:
    teacher = make_nontrivial(f"timm/{name}", size=SIZE)
    student = gn_convert.convert(teacher, 8).eval()
    report = gn_convert.export_onnx(student, tmp_path / "m.onnx", input_shape=(1, 3, SIZE, SIZE))
    norms = [m for m in student.modules() if isinstance(m, nn.GroupNorm)]
    assert report.counts.custom == len(norms) and report.counts.batchnorm == 0
    parity = gn_convert.check_parity(student, tmp_path / "m.onnx", input_shape=(1, 3, SIZE, SIZE), levels=("all",))
    assert parity.passed, parity
    assert max(row.metrics.max_rel for row in parity.rows) < 1e-4


@pytest.mark.slow
def test_parity_names_a_corrupted_norm_act_layer(tmp_path: Path) -> None:
    student = gn_convert.convert(make_nontrivial("timm/mobilenetv3_small_050", size=SIZE), 8).eval()
    gn_convert.export_onnx(student, tmp_path / "m.onnx", input_shape=(1, 3, SIZE, SIZE))
    target = [n for n, m in student.named_modules() if isinstance(m, GroupNormAct)][4]
    with torch.no_grad():
        student.get_submodule(target).bias += 0.5
    report = gn_convert.check_parity(student, tmp_path / "m.onnx", input_shape=(1, 3, SIZE, SIZE), levels=("off",))
    assert not report.passed
    found = report.localisation["cpu/off"]
    assert found.first_failing == target
    before = [layer.max_rel for layer in found.layers[:[layer.layer for layer in found.layers].index(target)]]
    assert len(before) == 4 and max(before) < 1e-5  # pre-activation outputs compared: exact until the corruption


@pytest.mark.slow
def test_cli_converts_a_timm_model_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from gn_convert.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["timm/resnet18", "--weights", "none", "--groups", "32"]) == 0
    report = json.loads((tmp_path / "gn-timm-resnet18" / "report.json").read_text())
    assert report["parity"]["passed"] and report["plan"]["groups"] == 32
    restored = gn_convert.load_converted(tmp_path / "gn-timm-resnet18")
    assert sum(isinstance(m, nn.GroupNorm) for m in restored.modules()) == 20
