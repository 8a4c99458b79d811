"""The ONNX exporter: parity with torch under onnxruntime, node counts, names, metadata,
every target, any input rank, and no file left behind on failure."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from gn_convert.errors import ExportError, OutputError
from gn_convert.onnx import export_onnx, groupnorm_layers, lower_onnx, read_model
from gn_convert.onnx import write as write_module
from gn_convert.onnx.op import DOMAIN, groupnorm_nodes
from gn_convert.onnx.verify import count_nodes
from helpers.models import MODELS

PARITY_BOUND = 1e-4
"""Max abs error relative to the output's scale (the issue's bound)."""


def run_ort(path, x: torch.Tensor, optimize: bool = True) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def relative_error(got: np.ndarray, ref: torch.Tensor) -> float:
    ref = ref.detach().double().numpy()
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


def groupnorm_modules(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)]


@pytest.mark.parametrize("target", ["function", "inlined", "standard"])
@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_matches_torch_at_batch_1_and_7_within_1e4(name: str, target: str, exports) -> None:
    model, x = exports.converted(name), exports.crops()
    report = exports.exported(name, target)
    with torch.no_grad():
        ref = model(x)
    for batch in (x[:1], x):
        err = relative_error(run_ort(report.path, batch), ref[: len(batch)])
        assert err < PARITY_BOUND, f"{name} {target} batch {len(batch)}: {err:.2e}"


@pytest.mark.parametrize("name", MODELS)
def test_function_form_has_one_named_custom_node_per_groupnorm_layer(name: str, exports) -> None:
    model, report = exports.converted(name), exports.exported(name)
    onnx_model = read_model(report.path)
    layers = groupnorm_modules(model)
    nodes = groupnorm_nodes(onnx_model)
    assert len(nodes) == len(layers) == report.counts.custom > 0
    assert sorted(node.name for node in nodes) == sorted(layers)
    assert count_nodes(onnx_model).batchnorm == 0
    functions = [f for f in onnx_model.functions if f.domain == DOMAIN]
    assert len(functions) == 1 and functions[0].opset_import[0].version == report.opset == 21
    assert [layer for layer, _ in groupnorm_layers(onnx_model)] == [node.name for node in nodes]
    dims = onnx_model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    onnx.checker.check_model(str(report.path), full_check=True)


@pytest.mark.parametrize("name", MODELS)
def test_lowered_targets_have_no_custom_node_and_keep_layer_outputs(name: str, exports) -> None:
    calls = len(groupnorm_modules(exports.converted(name)))
    inlined = read_model(exports.exported(name, "inlined").path)
    standard = read_model(exports.exported(name, "standard").path)
    for model in (inlined, standard):
        assert not groupnorm_nodes(model) and not model.functions
        assert all(entry.domain != DOMAIN for entry in model.opset_import)
        produced = {out for node in model.graph.node for out in node.output}
        assert all(value in produced for _, value in groupnorm_layers(model))
    assert count_nodes(standard).standard_groupnorm == calls
    named = {node.name.split("/")[0] for node in inlined.graph.node if "/" in node.name}
    assert named == set(groupnorm_modules(exports.converted(name)))


def test_metadata_records_version_target_shape_and_plan(exports) -> None:
    props = {p.key: p.value for p in read_model(exports.exported("resnet18").path).metadata_props}
    assert props["gn_convert.target"] == "function"
    assert props["gn_convert.input_shape"] == "1,3,64,64"
    assert props["gn_convert.group_summary"] == "20 GroupNorm layers (G=32: 20), 0 BatchNorm layers"
    assert len(json.loads(props["gn_convert.groupnorm_layers"])) == 20
    lowered = {p.key: p.value for p in read_model(exports.exported("resnet18", "inlined").path).metadata_props}
    assert lowered["gn_convert.target"] == "inlined"


class _AnyRank(nn.Module):
    """GroupNorm in every way a model can hold it: rank 3 and 5, no affine, a layer called
    twice, and a functional call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(2, 6, 3)
        self.gn1d = nn.GroupNorm(3, 6)
        self.conv3d = nn.Conv3d(2, 8, 3)
        self.gn3d = nn.GroupNorm(4, 8, eps=1e-3)
        self.plain = nn.GroupNorm(2, 8, affine=False)
        self.shared = nn.GroupNorm(2, 8)
        for gn in (self.gn1d, self.gn3d, self.shared):
            nn.init.uniform_(gn.weight, 0.5, 2.0)
            nn.init.uniform_(gn.bias, -1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.gn1d(self.conv1d(x.flatten(2)))                       # rank 3
        b = self.shared(self.shared(self.plain(self.gn3d(self.conv3d(x)))))  # rank 5
        c = nn.functional.group_norm(b, 4)                            # functional, no module
        return a.mean(dim=2).sum(dim=1, keepdim=True) + c.flatten(1)


@pytest.mark.parametrize("target", ["function", "inlined", "standard"])
def test_any_rank_shared_functional_and_non_affine_layers(tmp_path, target: str) -> None:
    model = _AnyRank().eval()
    x = torch.randn(3, 2, 5, 6, 7) * 4 + 50
    report = export_onnx(model, tmp_path / "m.onnx", target=target, input_shape=(2, 2, 5, 6, 7))
    assert report.counts.custom == (6 if target == "function" else 0)
    if target == "function":
        names = sorted(node.name for node in groupnorm_nodes(read_model(report.path)))
        assert [n for n in names if not n.startswith("node_")] == ["gn1d", "gn3d", "plain", "shared", "shared#1"]
    with torch.no_grad():
        assert relative_error(run_ort(report.path, x), model(x)) < PARITY_BOUND


def test_batchnorm_model_is_refused_and_nothing_written(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ExportError, match="still has 1 BatchNorm layers \\(1\\).*--baseline"):
        export_onnx(model, tmp_path / "out" / "m.onnx", input_shape=(1, 3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_baseline_export_keeps_batchnorm_and_matches(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    model.eval()
    report = export_onnx(model, tmp_path / "bn.onnx", input_shape=(1, 3, 12, 12), allow_batchnorm=True)
    assert report.counts.custom == 0 and report.counts.batchnorm == 0 and report.counts.total == 3  # BN folded into the convs
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        assert relative_error(run_ort(report.path, x), model(x)) < PARITY_BOUND


@pytest.mark.parametrize("where", ["parent-is-file", "destination-is-folder"])
def test_unwritable_path_fails_with_one_line_and_leaves_nothing(tmp_path, where: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.onnx").mkdir()
    path = tmp_path / "file" / "m.onnx" if where == "parent-is-file" else tmp_path / "folder.onnx"
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    with pytest.raises(OutputError) as info:
        export_onnx(model, path, input_shape=(1, 3, 8, 8))
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file", "folder.onnx"]


def test_failed_check_leaves_no_file(tmp_path, monkeypatch) -> None:
    def broken(model, path):
        raise ExportError("the exported model fails onnx's checker: injected")

    monkeypatch.setattr(write_module, "check_onnx", broken)
    with pytest.raises(ExportError, match="injected"):
        export_onnx(nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)), tmp_path / "new" / "m.onnx",
                    input_shape=(1, 3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_external_data_writes_a_data_file_that_onnxruntime_loads(tmp_path, monkeypatch) -> None:
    """The over-2-GB path, forced on a small model: external data and detached-weight lowering."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.Conv2d(16, 8, 3)).eval()
    monkeypatch.setattr(write_module, "needs_external_data", lambda m: True)
    report = export_onnx(model, tmp_path / "m.onnx", target="inlined", input_shape=(1, 3, 10, 10))
    assert [p.name for p in report.files] == ["m.onnx", "m.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert report.files[1].stat().st_size >= 8 * 16 * 9 * 4  # the second conv's weights at least
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        assert relative_error(run_ort(report.path, x), model(x)) < PARITY_BOUND


def test_fp16_export_keeps_float16_io_and_fp32_statistics(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    report = export_onnx(model, tmp_path / "h.onnx", input_shape=(1, 3, 12, 12), fp16=True)
    onnx_model = read_model(report.path)
    assert onnx_model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    x = torch.randn(2, 3, 12, 12) + 100  # a large mean: fp16 statistics would lose it
    got = run_ort(report.path, x.half())
    assert got.dtype == np.float16
    with torch.no_grad():
        assert relative_error(got, model(x)) < 5e-3
    assert model[1].weight.dtype == torch.float32  # the model itself is untouched


def test_static_batch_and_mode_restored(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Dropout(0.5)).train()
    report = export_onnx(model, tmp_path / "s.onnx", input_shape=(3, 3, 8, 8), dynamic_batch=False)
    dims = read_model(report.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [3, 3, 8, 8]
    assert model.training and model[2].training


def test_bad_requests_are_refused(tmp_path, exports) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4))
    with pytest.raises(ExportError, match="unknown export target"):
        export_onnx(model, tmp_path / "m.onnx", target="tensorrt")
    with pytest.raises(ExportError, match="needs opset 21"):
        export_onnx(model, tmp_path / "m.onnx", target="standard", opset=20)
    with pytest.raises(ExportError, match="rank >= 3"):
        export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 3))
    with pytest.raises(ExportError, match="lower from the function form"):
        lower_onnx(exports.exported("resnet18", "inlined").path, tmp_path / "x.onnx", "standard")
    assert list(tmp_path.iterdir()) == []


class _Warns(nn.Module):
    """A model that warns in its forward, as user code may."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gn = nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        warnings.warn("the user's own warning", UserWarning, stacklevel=2)
        return self.gn(self.conv(x))


def test_export_leaves_the_callers_warning_filters_alone(tmp_path) -> None:
    """Defect: export_onnx replaced the caller's filters with "ignore" while it traced, so the
    user's own warnings (and their "always"/"error" choices) vanished during an export."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        before = list(warnings.filters)
        export_onnx(_Warns().eval(), tmp_path / "m.onnx", input_shape=(1, 3, 8, 8))
        assert warnings.filters == before
    assert [str(w.message) for w in seen if "user's own" in str(w.message)] == ["the user's own warning"]


def test_default_input_shape_comes_from_the_first_convolution(tmp_path) -> None:
    model = nn.Sequential(nn.Conv2d(5, 4, 3), nn.GroupNorm(2, 4))
    report = export_onnx(model, tmp_path / "m.onnx")
    assert report.input_shape == (1, 5, 224, 224)


def test_check_onnx_rejects_groups_that_do_not_divide_channels(tmp_path) -> None:
    import onnx.helper as oh

    from gn_convert.onnx.lowering.function import attach_function
    from gn_convert.onnx.op import OP_TYPE, opset_import
    from gn_convert.onnx.verify import check_onnx

    weights = [onnx.numpy_helper.from_array(np.ones(7, np.float32) * 0.5, n) for n in ("scale", "bias")]
    weights.append(onnx.numpy_helper.from_array(np.ones((7, 7, 1, 1), np.float32), "w"))  # 196 B
    weights.append(onnx.numpy_helper.from_array(np.ones(300, np.float32), "unused_large"))  # detached
    graph = oh.make_graph(
        [oh.make_node("Conv", ["X", "w"], ["c"]),
         oh.make_node(OP_TYPE, ["c", "scale", "bias"], ["Y"], domain=DOMAIN, num_groups=3)],
        "g", [oh.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [1, 7, 4, 4])],
        [oh.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [1, 7, 4, 4])], weights)
    model = attach_function(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21), opset_import()]))
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(ExportError, match="does not divide C=7"):
        check_onnx(tmp_path / "bad.onnx", model)
    assert len(model.graph.initializer[3].raw_data) == 1200  # weights restored after the check


@pytest.mark.parametrize("body", ["instance-norm", "two-pass", "layer-norm"])
def test_the_body_is_chosen_recorded_and_inlined(tmp_path, body: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.GroupNorm(16, 16)).eval()
    kwargs = {} if body == "layer-norm" else {"body": body}  # layer-norm is the default
    report = export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 3, 12, 12), **kwargs)
    loaded = onnx.load(report.path)
    assert {p.key: p.value for p in loaded.metadata_props}["gn_convert.body"] == body
    function = next(f for f in loaded.functions if f.domain == DOMAIN)
    assert ("InstanceNormalization" in {n.op_type for n in function.node}) == (body == "instance-norm")
    inlined = lower_onnx(report.path, tmp_path / "i.onnx", "inlined")
    ops = [n.op_type for n in onnx.load(inlined.path).graph.node]
    expected = {"instance-norm": ("InstanceNormalization", 2), "two-pass": ("ReduceMean", 4),
                "layer-norm": ("LayerNormalization", 2)}[body]
    assert ops.count(expected[0]) == expected[1] and inlined.counts.batchnorm == (0 if body == "two-pass" else 2)
    x = torch.randn(2, 3, 12, 12) + 100
    with torch.no_grad():
        ref = model(x).numpy()
    for path in (report.path, inlined.path):
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
        assert float(np.abs(out - ref).max() / np.abs(ref).max()) < PARITY_BOUND
