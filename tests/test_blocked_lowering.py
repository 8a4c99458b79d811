"""The ``blocked`` lowering: a standard-op GroupNorm that onnxruntime keeps on its NCHWc layout.

Numbers are against float64 torch (``helpers.onnx_cases``) with the bounds every function body
meets, on one-node models and on the same models behind a 1x1 identity Conv (so that onnxruntime
runs the form's ops on its blocked layout, as in a network), and against torch on the converted
test models through ``check_parity``. The graph checks open each file at ``ORT_ENABLE_ALL`` and
count the ``com.microsoft.nchwc`` reorders of full activations in the graph onnxruntime runs.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from gn_convert.bench.reorders import count_reorders
from gn_convert.errors import ExportError
from gn_convert.native.nchwc import block_size
from gn_convert.onnx.lowering.blocked import RESIZE_SUFFIX, to_blocked
from gn_convert.onnx.lowering.function import set_body
from gn_convert.onnx.op import DOMAIN
from gn_convert.onnx.reading import read_model
from gn_convert.onnx.verify import check_counts
from helpers.models import MODELS
from helpers.onnx_cases import (
    FP16_BOUND,
    FP32_BOUND,
    FP32_MEAN1000_BOUND,
    LEVELS,
    behind_identity_conv,
    inputs,
    one_node_model,
    reference,
    run,
    shape_id,
)

BLOCK = block_size()
needs_nchwc = pytest.mark.skipif(BLOCK not in (8, 16), reason=f"onnxruntime has no NCHWc layout on this CPU "
                                 f"(block {BLOCK}: it needs AVX2 or AVX-512), so there is no reorder to count")

SHAPES_GROUPS = [
    ((2, 64, 8, 8), 32),     # 2 channels per group (ResNet's G=32 at C=64)
    ((2, 64, 8, 8), 64),     # 1 channel per group: instance norm
    ((2, 48, 9, 11), 3),     # 3 groups of 16
    ((2, 80, 7, 5), 5),      # 5 groups of 16, odd spatial size
    ((2, 96, 6, 6), 6),      # 6 groups of 16
    ((2, 32, 56, 56), 1),    # one group over a large image
    ((1, 64, 28, 28), 32),
]
"""(N, C, H, W), G: every C a multiple of 16, so every case takes the blocked form."""
EPS = 1e-5


def _errors(model: onnx.ModelProto, feeds: dict[str, np.ndarray], groups: int, level: str) -> tuple[float, float]:
    """(max abs error, max abs error over the reference's max magnitude) against float64 torch."""
    got = run(model, feeds, LEVELS[level]).astype(np.float64)
    ref = reference(feeds, groups, EPS)
    err = float(np.abs(got - ref).max())
    return err, err / float(np.abs(ref).max())


def _resizes(model: onnx.ModelProto) -> int:
    return sum(1 for node in model.graph.node if node.op_type == "Resize" and node.name.endswith(RESIZE_SUFFIX))


@pytest.mark.parametrize("placement", ["input", "between-convs"])
@pytest.mark.parametrize("level", LEVELS, ids=str)
@pytest.mark.parametrize("shape,groups", SHAPES_GROUPS, ids=shape_id)
@pytest.mark.parametrize("mean,bound", [(0.0, FP32_BOUND), (1000.0, FP32_MEAN1000_BOUND)], ids=["mean0", "mean1000"])
def test_blocked_form_matches_float64_torch(shape: tuple[int, ...], groups: int, mean: float, bound: float, level: str,
                                            placement: str) -> None:
    """The function bodies' bounds, on the plain layout (X a graph input) and on the blocked one (X a Conv's output)."""
    model = to_blocked(one_node_model(shape, groups, EPS, onnx.TensorProto.FLOAT))
    assert _resizes(model) == 1
    feeds = inputs(shape, mean, np.float32)
    if placement == "between-convs":
        model = behind_identity_conv(model, feeds, conv_after=True)
    err, rel = _errors(model, feeds, groups, level)
    print(f"\n{shape} G={groups} mean {mean:g} {level} {placement}: max abs error {err:.1e}, relative {rel:.1e}")
    assert rel < bound, f"relative error {rel:.2e} >= {bound:.0e}"


@pytest.mark.parametrize(("shape", "groups"), [((2, 64, 56, 56), 32), ((1, 64, 112, 112), 32), ((2, 32, 56, 56), 1)],
                         ids=shape_id)
def test_blocked_form_at_mean_1000_is_within_2e6_of_float64_on_the_blocked_layout(shape: tuple[int, ...],
                                                                                  groups: int) -> None:
    """The corrected two-pass statistics: 1.1e-6 measured at 112x112 and mean 1000 (the default layer-norm
    body: 6.8e-6; fast: 1.7e-4), where float32 resolves the input itself to 6e-5."""
    feeds = inputs(shape, 1000.0, np.float32)
    model = behind_identity_conv(to_blocked(one_node_model(shape, groups, EPS, onnx.TensorProto.FLOAT)), feeds)
    for level in LEVELS:
        assert _errors(model, feeds, groups, level)[1] < 2e-6, level


@pytest.mark.parametrize(("shape", "groups", "dtype", "why"), [
    ((3, 8, 5, 7), 4, onnx.TensorProto.FLOAT, "C not a multiple of 16"),
    ((2, 24, 6, 6), 8, onnx.TensorProto.FLOAT, "C not a multiple of 16"),
    ((2, 32, 17), 4, onnx.TensorProto.FLOAT, "rank 3"),
    ((2, 4, 3, 4, 5), 2, onnx.TensorProto.FLOAT, "rank 5"),
    ((2, 32, 6, 6), 8, onnx.TensorProto.FLOAT16, "float16"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_calls_the_blocked_form_cannot_take_get_the_fast_form(shape: tuple[int, ...], groups: int, dtype: int,
                                                              why: str) -> None:
    model = to_blocked(one_node_model(shape, groups, EPS, dtype))
    ops = Counter(node.op_type for node in model.graph.node)
    assert _resizes(model) == 0 and ops["InstanceNormalization"] == 1, why
    assert not model.functions and all(entry.domain != DOMAIN for entry in model.opset_import)
    numpy_type = np.float16 if dtype == onnx.TensorProto.FLOAT16 else np.float32
    for mean, bound in ((0.0, FP32_BOUND), (1000.0, FP32_MEAN1000_BOUND)):
        feeds = inputs(shape, mean, numpy_type)
        assert _errors(model, feeds, groups, "opt-all")[1] < (FP16_BOUND if numpy_type == np.float16 else bound)


def test_blocked_form_with_a_symbolic_spatial_size_gets_the_fast_form() -> None:
    model = one_node_model((2, 32, 6, 6), 8, EPS, onnx.TensorProto.FLOAT)
    for value in (*model.graph.input[:1], *model.graph.output):
        value.type.tensor_type.shape.dim[2].dim_param = "H"
    lowered = to_blocked(model)
    assert _resizes(lowered) == 0 and sum(n.op_type == "InstanceNormalization" for n in lowered.graph.node) == 1


def test_blocked_form_records_equal_shapes_for_its_mul() -> None:
    """onnxruntime keeps a Mul blocked only when it can prove its operands' shapes equal; Resize's inferred shape
    has no batch, so the pass writes both as [batch, C, H, W]."""
    model = to_blocked(one_node_model((2, 64, 8, 8), 32, EPS, onnx.TensorProto.FLOAT))
    onnx.checker.check_model(model, full_check=True)
    infos = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    mul = next(node for node in model.graph.node if node.op_type == "Mul" and node.input[1].endswith(RESIZE_SUFFIX))
    assert infos[mul.input[0]] == infos[mul.input[1]] == ["N", 64, 8, 8]


@needs_nchwc
def test_one_call_on_the_blocked_layout_leaves_no_reorder_of_the_activation() -> None:
    """Between two Convs, the default body reorders the activation out before the call and back in after it;
    the blocked form reorders only its [N, C, 1, 1] statistics (both reorder the graph's input in and output out)."""
    shape, groups = (2, 64, 16, 16), 32
    feeds = inputs(shape, 0.0, np.float32)
    default, blocked = (count_reorders(behind_identity_conv(lower(one_node_model(shape, groups, EPS, onnx.TensorProto.FLOAT)),
                                                            feeds, conv_after=True)) for lower in (lambda m: m, to_blocked))
    assert (default.large_out, default.large_in, default.small_out, default.small_in) == (2, 2, 0, 0)
    assert (blocked.large_out, blocked.large_in) == (1, 1)
    assert (blocked.small_out, blocked.small_in) == (3, 3)  # mean, squares, deviations out; three results in


@pytest.fixture(scope="module", params=MODELS)
def lowered(request: pytest.FixtureRequest, exports) -> tuple[str, onnx.ModelProto, onnx.ModelProto]:
    name = request.param
    return name, read_model(exports.exported(name).path), read_model(exports.exported(name, "blocked").path)


def test_blocked_export_target_passes_parity(lowered, exports) -> None:
    from gn_convert import check_parity

    name, _, _ = lowered
    parity = check_parity(exports.converted(name), exports.exported(name, "blocked").path, levels=("off", "all"),
                          batch=2)
    assert parity.passed, parity.table()
    assert max(r.metrics.max_rel for r in parity.rows if r.inputs == "random") < 1e-4


def test_blocked_form_takes_every_call_whose_channels_16_divides(lowered) -> None:
    name, function, model = lowered
    calls = [node for node in function.graph.node if node.domain == DOMAIN]
    channels = {init.name: init.dims[0] for init in function.graph.initializer if len(init.dims) == 1}
    eligible = sum(1 for node in calls if channels[node.input[1]] % 16 == 0)
    ops = Counter(node.op_type for node in model.graph.node)
    assert _resizes(model) == eligible > 0
    assert ops["InstanceNormalization"] == len(calls) - eligible
    assert {p.key: p.value for p in model.metadata_props}["gn_convert.target"] == "blocked"
    counts = check_counts(model, "blocked", len(calls), allow_batchnorm=False)
    assert counts.blocked_groupnorm == eligible
    with pytest.raises(ExportError, match=f"expected {len(calls) + 1} GroupNorm calls in the blocked form"):
        check_counts(model, "blocked", len(calls) + 1, allow_batchnorm=False)


REORDERS_AT_BLOCK_16 = {
    # model: (BatchNorm original, default function file, instance-norm body, blocked form): large reorders,
    # measured with onnxruntime 1.32 on an AVX-512 CPU (block 16), 64x64 input
    "resnet18": (1, 37, 37, 1),
    "mobilenet_v3_small": (19, 67, 67, 39),
}


@needs_nchwc
def test_blocked_form_leaves_fewer_reorders_of_activations_than_the_default(lowered, exports, tmp_path) -> None:
    """The point of the form: onnxruntime keeps each GroupNorm's activation on its blocked layout, so the
    reorders around GroupNorm that the function bodies cost are gone (resnet18: all of them; mobilenet_v3_small:
    those of the calls whose C is a multiple of 16, the others get the fast form)."""
    from gn_convert.onnx import export_onnx

    name, function, model = lowered
    instance = tmp_path / "instance-norm.onnx"
    onnx.save(set_body(read_model(exports.exported(name).path), "instance-norm"), str(instance))
    bn = export_onnx(exports.teacher(name), tmp_path / "bn.onnx", input_shape=(1, 3, 64, 64), allow_batchnorm=True)
    counts = {form: count_reorders(path) for form, path in [("bn", bn.path), ("function", exports.exported(name).path),
                                                            ("instance-norm", instance),
                                                            ("blocked", exports.exported(name, "blocked").path)]}
    print(f"\n{name}, block {BLOCK}: " + "; ".join(f"{form} {c.large} ({c.large_out} out, {c.large_in} in, "
                                                 f"{c.large_elements} elements a sample)" for form, c in counts.items()))
    assert counts["blocked"].large < min(counts["function"].large, counts["instance-norm"].large)
    assert counts["blocked"].large_elements < counts["function"].large_elements
    if BLOCK == 16:
        assert tuple(c.large for c in counts.values()) == REORDERS_AT_BLOCK_16[name]
