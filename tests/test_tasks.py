"""Segmentation, video and detection models by name: listed by task, built offline without their
backbone weights, converted, exported with one custom node per GroupNorm and checked for parity on
what each task outputs (per-pixel logits, clip logits, features and matched detections)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import gn_convert
from gn_convert.cli import main
from gn_convert.errors import WeightsError, WeightsUnavailableError
from gn_convert.load.names import list_models, models_by_task
from gn_convert.onnx.op import OP_TYPE
from gn_convert.parity.tolerances import Tolerance
from gn_convert.tasks import TASKS, task_of
from gn_convert.testing.photos import nontrivial_batchnorm

DEEPLAB_SIZE = 64


def frozen(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm2d replaced by a FrozenBatchNorm2d of the same statistics, as
    torchvision builds the backbones of pretrained detection models."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.BatchNorm2d:
            replacement = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            replacement.load_state_dict({k: v for k, v in module.state_dict().items() if k != "num_batches_tracked"})
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, replacement)
    return model


def test_every_task_lists_its_batchnorm_models_and_names_those_without() -> None:
    found = models_by_task()
    assert list(found) == ["classification", "segmentation", "detection", "video"]
    assert {"deeplabv3_resnet50", "fcn_resnet50", "lraspp_mobilenet_v3_large"} <= set(found["segmentation"][0])
    assert {"fasterrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn",
            "fcos_resnet50_fpn", "ssdlite320_mobilenet_v3_large"} <= set(found["detection"][0])
    assert found["video"][0] == ["mc3_18", "r2plus1d_18", "r3d_18", "s3d"]
    assert found["detection"][1] == ["ssd300_vgg16"] and {"mvit_v1_b", "swin3d_t"} <= set(found["video"][1])
    assert len(list_models()) == sum(len(with_bn) for with_bn, _ in found.values())
    assert task_of("r3d_18").name == "video" and task_of("timm/resnet18").name == "classification"


def test_list_prints_models_by_task(capsys: pytest.CaptureFixture) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "segmentation (6):\n  deeplabv3_mobilenet_v3_large" in out
    assert "without BatchNorm, nothing to convert: ssd300_vgg16" in out
    assert main(["list", "--task", "video"]) == 0
    assert capsys.readouterr().out.split() == ["mc3_18", "r2plus1d_18", "r3d_18", "s3d"]


def test_dense_models_build_offline_without_backbone_weights_and_fail_fast_when_asked_for_them(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = gn_convert.load_model("deeplabv3_mobilenet_v3_large", "none")  # no download: the backbone is untrained
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 53
    with pytest.raises(WeightsUnavailableError, match=r"MobileNet_V3_Large_Weights\.IMAGENET1K_V1 .* not cached at "
                                                      rf"{tmp_path}/torch/hub/checkpoints/"):
        gn_convert.load_model("deeplabv3_mobilenet_v3_large", "none", weights_backbone="DEFAULT")
    with pytest.raises(WeightsError, match="resnet18 takes no separate backbone weights"):
        gn_convert.load_model("resnet18", "none", weights_backbone="DEFAULT")
    with pytest.raises(WeightsError, match="already hold its backbone"):
        gn_convert.load_model("fcn_resnet50", str(tmp_path / "x.pt"), weights_backbone="DEFAULT")


def test_a_dense_models_local_weights_file_loads(tmp_path: Path) -> None:
    source = nontrivial_batchnorm(TASKS["segmentation"].build("lraspp_mobilenet_v3_large", weights_backbone=None),
                                  size=64)
    torch.save(source.state_dict(), tmp_path / "lraspp.pt")
    loaded = gn_convert.load_model("lraspp_mobilenet_v3_large", str(tmp_path / "lraspp.pt"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), source.state_dict().values()))


def test_segmentation_exports_out_and_aux_and_checks_each_per_pixel(tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = TASKS["segmentation"]
    model = nontrivial_batchnorm(task.build("deeplabv3_mobilenet_v3_large", aux_loss=True), size=DEEPLAB_SIZE)
    converted = gn_convert.convert(model, 16)
    report = task.export(converted, tmp_path / "seg.onnx", input_size=(DEEPLAB_SIZE, DEEPLAB_SIZE))
    graph = onnx.load(str(report.path)).graph
    assert [o.name for o in graph.output] == ["out", "aux"]
    layers = sum(isinstance(m, nn.GroupNorm) for m in converted.modules())
    assert layers == 54 and sum(n.op_type == OP_TYPE for n in graph.node) == layers and report.counts.batchnorm == 0
    parity = task.check_parity(converted, report.path, batch=2)
    assert parity.passed and {row.output for row in parity.rows} == {"out", "aux"}
    assert max(row.metrics.max_rel for row in parity.rows if row.inputs == "random") < 1e-4
    changed = copy.deepcopy(converted)
    with torch.no_grad():
        changed.aux_classifier[1].bias.add_(0.5)  # only the auxiliary head's GroupNorm differs
    failed = task.check_parity(changed, report.path, batch=2, localise_failures=False)
    assert not failed.passed and {row.output for row in failed.rows if not row.passed} == {"aux"}


@pytest.mark.slow
def test_cli_converts_a_video_model_with_5d_inputs(tmp_path: Path) -> None:
    out = tmp_path / "r3d"
    assert main(["r3d_18", "--weights", "none", "--groups", "32", "--input-size", "32", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "video" and report["onnx"]["input_shape"] == [1, 3, 16, 32, 32]
    assert report["onnx"]["counts"]["custom"] == 20 and report["onnx"]["counts"]["batchnorm"] == 0
    assert report["parity"]["passed"] and report["parity"]["worst_max_rel"] < 1e-4
    assert json.loads((out / "config.json").read_text())["input_size"] == [16, 32, 32]
    again = gn_convert.load_converted(out)
    assert sum(isinstance(m, nn.GroupNorm) for m in again.modules()) == 20


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["BatchNorm2d", "FrozenBatchNorm2d"])
def test_detection_exports_torchvisions_way_and_matches_features_and_detections(tmp_path: Path, norm: str) -> None:
    """Built without weights a backbone has BatchNorm2d; pretrained, FrozenBatchNorm2d: both convert."""
    torch.manual_seed(0)
    task = TASKS["detection"]
    model = task.build("fasterrcnn_mobilenet_v3_large_320_fpn").eval()
    nontrivial_batchnorm(model.backbone, size=96, batch_size=2)
    model = frozen(model) if norm == "FrozenBatchNorm2d" else model
    assert sum(type(m).__name__ == norm for m in model.modules()) == 46
    converted = gn_convert.convert(model, 16).eval()
    report = task.export(converted, tmp_path / "det.onnx", input_size=(160, 192))
    graph = onnx.load(str(report.path)).graph
    assert [o.name for o in graph.output] == ["boxes", "labels", "scores"]
    assert sum(n.op_type == OP_TYPE for n in graph.node) == 46 and report.counts.batchnorm == 0
    parity = task.check_parity(converted.train(), report.path, input_size=(160, 192), batch=2)
    assert parity.passed, parity.failures()
    assert converted.training and all(m.training for m in converted.modules())  # the caller's mode comes back
    converted.eval()
    strict = task.check_parity(converted, report.path, input_size=(160, 192),
                               tolerances={("cpu", "float32"): Tolerance(1e-12, 0.99999, 1e-4)})
    assert not strict.passed and strict.layers[0].tolerance == 1e-12  # a user's bound is taken, literally
    opened = [row for row in parity.rows if row.variant == "threshold 0"]
    assert opened and all(row.torch_count > 0 and row.matched >= 0.9 * row.torch_count for row in opened)
    assert [row.layers for row in parity.layers] == [46] * 3 and parity.worst_max_rel < 1e-4
    wrong = copy.deepcopy(converted)
    with torch.no_grad():
        next(m for m in wrong.backbone.modules() if isinstance(m, nn.GroupNorm)).weight.mul_(3.0)
    failed = task.check_parity(wrong, report.path, input_size=(160, 192), batch=2)
    assert not failed.passed and failed.layers[0].first_failing == "backbone.body.0.1"


def test_the_native_kernel_runs_video_clips_and_parity_skips_the_blocked_row(native_library: Path,
                                                                              tmp_path: Path) -> None:
    """5-D (N, C, D, H, W) through the native kernel; onnxruntime's blocked layout holds 2-D convolutions only,
    so the check no longer reports the blocked row as a failure for a clip model."""
    torch.manual_seed(0)
    task = TASKS["video"]
    converted = gn_convert.convert(task.build("r3d_18", num_classes=10).eval(), 16)
    path = task.export(converted, tmp_path / "r3d.onnx", input_size=(16, 32, 32)).path
    parity = task.check_parity(converted, path, providers=("cpu", "cpu-native"), batch=2,
                               native_library=native_library)
    assert parity.passed and not parity.errors, parity.failures()
    native = [row for row in parity.rows if row.provider == "cpu-native"]
    assert {row.level for row in native} == {"off", "all"} and max(r.metrics.max_rel for r in native) < 1e-5


def test_torchscript_node_names_map_to_module_names_shared_calls_included() -> None:
    """FCOS's head runs one tower on every FPN level: the exporter names the calls conv.10, conv.10_1, ...;
    each call is the layer conv.10 (the sweep found FCOS's head layers exported as unnamed nodes)."""
    from gn_convert.onnx.script_trace import scopes_from_name

    assert scopes_from_name("/backbone/body/layer1/layer1.0/bn1/GroupNorm")[-2] == "backbone.body.layer1.0.bn1"
    assert scopes_from_name("/head/classification_head/conv/conv.10_2/GroupNorm")[-2] == \
        "head.classification_head.conv.10"
    assert scopes_from_name("/stem/bn_1/GroupNorm")[-2] == "stem.bn_1"  # a module's own name ending in _1 stays
