"""GroupNorm on onnxruntime's blocked layout (gn_convert.native.nchwc, GroupNormNchwc).

The kernel against float64 numpy on hand-made blocked tensors (every activation, with and
without the residual, groups smaller and larger than the block, padded channels, input mean
1000); the graph rewrite on small networks: how many GroupNorms moved, which reorders are left,
the fused activations, and the outputs against onnxruntime's own model; the safety nets (an
input read by another node is not overwritten, a rewrite that changes the output is refused,
no blocked layout falls back to the plain kernel); squeeze-excite's pooling and gating on the
blocked layout (ScaleNchwc).
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from gn_convert.errors import NativeBuildError, OptionError
from gn_convert.native import nchwc, nchwc_cache
from gn_convert.onnx import export_onnx
from gn_convert.onnx.passes import blocked_layout
from gn_convert.runtime import open_session

BLOCK = nchwc.block_size()
pytestmark = pytest.mark.skipif(BLOCK not in (8, 16), reason=f"onnxruntime has no NCHWc layout on this CPU (block {BLOCK})")

KERNEL_BOUND = 2e-6
"""Largest error against float64 relative to the output's scale, input mean 0 (measured about 5e-7)."""
MEAN1000_BOUND = 1e-4
"""The same at input mean 1000, as the plain kernel's bound (tests/test_native.py)."""


def to_blocked(x: np.ndarray, block: int) -> np.ndarray:
    """NCHW -> onnxruntime's NCHWc memory order, shaped [N, Cp, H, W] (padding channels zero)."""
    n, c, h, w = x.shape
    padded = -(-c // block) * block
    full = np.zeros((n, padded, h, w), x.dtype)
    full[:, :c] = x
    return full.reshape(n, padded // block, block, h, w).transpose(0, 1, 3, 4, 2).reshape(n, padded, h, w).copy()


def from_blocked(y: np.ndarray, channels: int, block: int) -> np.ndarray:
    """The inverse of :func:`to_blocked` (padding channels dropped)."""
    n, padded, h, w = y.shape
    return y.reshape(n, padded // block, h, w, block).transpose(0, 1, 4, 2, 3).reshape(n, padded, h, w)[:, :channels]


def reference(x, scale, bias, groups, residual=None, activation="", alpha=1.0, beta=0.0):
    """GroupNorm, + residual, activation, in float64."""
    x = x.astype(np.float64)
    n, c = x.shape[:2]
    g = x.reshape(n, groups, -1)
    y = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(x.shape)
    y = y * scale[None, :, None, None] + bias[None, :, None, None]
    if residual is not None:
        y = y + residual
    if activation == "Relu":
        y = np.maximum(y, 0)
    elif activation == "HardSwish":
        y = y * np.clip(alpha * y + beta, 0, 1)
    elif activation == "QuickGelu":
        y = y / (1 + np.exp(-alpha * y))
    return y


def kernel_model(padded: int, channels: int, groups: int, residual: bool, **attrs) -> bytes:
    """One GroupNormNchwc node whose X (and Z) are graph inputs already in blocked order."""
    shape = ["N", padded, "H", "W"]
    names = ["x", "scale", "bias"] + (["z"] if residual else [])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
              helper.make_tensor_value_info("scale", TensorProto.FLOAT, [channels]),
              helper.make_tensor_value_info("bias", TensorProto.FLOAT, [channels])]
    if residual:
        inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, shape))
    node = helper.make_node(nchwc.FUSED_OP, names, ["y"], domain=nchwc.OP_DOMAIN, num_groups=groups, epsilon=1e-5,
                            channels=channels, block=BLOCK, **{"activation": "", **attrs})
    graph = helper.make_graph([node], "k", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(nchwc.OP_DOMAIN, 1)]
                             ).SerializeToString()


ACTIVATIONS = [{}, {"activation": "Relu"}, {"activation": "HardSwish", "alpha": 1 / 6, "beta": 0.5},
               {"activation": "QuickGelu", "alpha": 1.0}, {"activation": "QuickGelu", "alpha": 1.702}]
CHANNELS_GROUPS = [(64, 32), (256, 32), (128, 8), (96, 4), (20, 5), (30, 2), (24, 1)]
"""Groups of 2, 8, 16, 24, 4 (padded to the block), 15 (a unit wider than the tensor) and 24 channels."""


def _run_kernel(native_library, x, scale, bias, groups, z=None, **attrs):
    channels = x.shape[1]
    feeds = {"x": to_blocked(x, BLOCK), "scale": scale, "bias": bias}
    if z is not None:
        feeds["z"] = to_blocked(z, BLOCK)
    sess = open_session(kernel_model(feeds["x"].shape[1], channels, groups, z is not None, **attrs), threads=2,
                        library=native_library, blocked=False)
    out = sess.run(None, feeds)[0]
    return out, from_blocked(out, channels, BLOCK)


@pytest.mark.parametrize("channels,groups", CHANNELS_GROUPS, ids=lambda v: str(v))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("attrs", ACTIVATIONS, ids=lambda a: f"{a.get('activation') or 'none'}{a.get('alpha', '')}")
def test_kernel_matches_float64(native_library: Path, channels: int, groups: int, residual: bool, attrs: dict) -> None:
    rng = np.random.default_rng(channels * 7 + groups)
    x = (rng.standard_normal((2, channels, 9, 7)) * 3 + 0.5).astype(np.float32)
    scale = rng.uniform(0.5, 2, channels).astype(np.float32)
    bias = rng.standard_normal(channels).astype(np.float32)
    z = rng.standard_normal(x.shape).astype(np.float32) if residual else None
    raw, got = _run_kernel(native_library, x, scale, bias, groups, z, **attrs)
    want = reference(x, scale, bias, groups, z, attrs.get("activation", ""), attrs.get("alpha", 1.0), attrs.get("beta", 0.0))
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error < KERNEL_BOUND, error
    assert not from_blocked(raw, raw.shape[1], BLOCK)[:, channels:].any(), "padding channels must stay zero"


def test_kernel_mean_1000(native_library: Path) -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 64, 28, 28)) + 1000).astype(np.float32)
    scale, bias = np.ones(64, np.float32), np.zeros(64, np.float32)
    _, got = _run_kernel(native_library, x, scale, bias, 8)
    error = np.abs(got - reference(x, scale, bias, 8)).max()
    assert error < MEAN1000_BOUND, error


def test_kernel_channel_means_apart(native_library: Path) -> None:
    """Channels of one group far apart (means 1000 +- 50, spread 0.5), groups of 30 that straddle blocks, and
    more positions than one chunk: the group's variance is mostly between channels, so it rests on the
    combine of each channel's mean and squared deviations."""
    rng = np.random.default_rng(11)
    offsets = rng.uniform(-50, 50, 60)[None, :, None, None]
    x = (rng.standard_normal((2, 60, 24, 20)) * 0.5 + 1000 + offsets).astype(np.float32)
    scale, bias = rng.uniform(0.5, 2, 60).astype(np.float32), rng.standard_normal(60).astype(np.float32)
    _, got = _run_kernel(native_library, x, scale, bias, 2)
    want = reference(x, scale, bias, 2)
    error = np.abs(got - want).max() / np.abs(want).max()
    assert error < MEAN1000_BOUND, error  # measured 6e-7


@pytest.mark.parametrize("gate_layout", ["plain", "blocked"])
def test_scale_kernel(native_library: Path, gate_layout: str) -> None:
    """ScaleNchwc (squeeze-excite's gating): y = x * s[n, c], the gate plain [N, C, 1, 1] or blocked."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 20, 5, 6)).astype(np.float32)
    gate = rng.uniform(0, 1, (2, 20, 1, 1)).astype(np.float32)
    xb = to_blocked(x, BLOCK)
    gb = to_blocked(gate, BLOCK) if gate_layout == "blocked" else gate
    node = helper.make_node(blocked_layout.SCALE_OP, ["x", "s"], ["y"], domain=nchwc.OP_DOMAIN, channels=20, block=BLOCK)
    graph = helper.make_graph([node], "s", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(xb.shape)),
                                            helper.make_tensor_value_info("s", TensorProto.FLOAT, list(gb.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(xb.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(nchwc.OP_DOMAIN, 1)])
    out = open_session(model.SerializeToString(), library=native_library, blocked=False).run(None, {"x": xb, "s": gb})[0]
    np.testing.assert_array_equal(from_blocked(out, 20, BLOCK), x * gate)
    assert not from_blocked(out, out.shape[1], BLOCK)[:, 20:].any()


def test_kernel_refuses_bad_attributes(native_library: Path) -> None:
    with pytest.raises(Exception, match="activation one of"):
        open_session(kernel_model(BLOCK, 8, 2, False, activation="Gelu"), library=native_library, blocked=False)


class Block(nn.Module):
    """conv -> GN -> activation, with a residual where asked; ``tap`` also reads the conv's output:
    ``"conv"`` with a convolution (blocked layout), ``"mean"`` with a spatial mean (plain layout)."""

    def __init__(self, channels: int, groups: int, act: nn.Module | None, residual: bool, tap: str = "") -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels)
        self.act, self.residual, self.tap = act, residual, tap
        self.tap_conv = nn.Conv2d(channels, channels, 1) if tap == "conv" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        y = self.norm(h)
        if self.residual:
            y = y + x
        if self.act is not None:
            y = self.act(y)
        if self.tap == "conv":
            return y + self.tap_conv(h)
        return y + h.mean((2, 3), keepdim=True) if self.tap == "mean" else y


def small_net(tap: str = "") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(),
                        Block(32, 8, nn.ReLU(), residual=True), Block(32, 4, nn.Hardswish(), residual=False),
                        Block(32, 16, nn.SiLU(), residual=False), Block(32, 8, None, residual=True, tap=tap),
                        nn.Conv2d(32, 40, 1), nn.GroupNorm(5, 40), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 10))
    for m in net.modules():
        if isinstance(m, nn.GroupNorm):  # non-trivial affine
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("nchwc") / "small.onnx"
    export_onnx(small_net(), path, input_shape=(1, 3, 32, 32))
    return path


def _ops(data: bytes) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load_from_string(data).graph.node)


def _compare(path_or_bytes, native_library: Path, data: bytes) -> float:
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    plain = open_session(path_or_bytes, library=native_library, blocked=False)
    want = plain.run(None, {plain.get_inputs()[0].name: x})[0]
    sess = open_session(data, library=native_library, blocked=False)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_rewrite_moves_every_groupnorm(small_onnx: Path, native_library: Path) -> None:
    data, fused = nchwc.nchwc_model(small_onnx, native_library)
    ops = _ops(data)
    assert fused == 6 and ops[nchwc.FUSED_OP] == 6 and ops["GroupNorm"] == 0
    # the head's pooling runs blocked too: one small reorder out after it; none around any GroupNorm
    assert ops["ReorderOutput"] == 1 and ops["ReorderInput"] == 0 and ops["GlobalAveragePool"] == 1
    for name in ("Relu", "Add", "HardSigmoid", "QuickGelu", "HardSwish"):
        assert ops[name] == 0, name
    acts = collections.Counter((helper.get_attribute_value(next(a for a in n.attribute if a.name == "activation")).decode(),
                                len(n.input) == 4) for n in onnx.load_from_string(data).graph.node
                               if n.op_type == nchwc.FUSED_OP)
    assert acts == {("Relu", False): 2, ("Relu", True): 1, ("HardSwish", False): 1, ("QuickGelu", False): 1,
                    ("", True): 1}
    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    assert meta[nchwc.LAYOUT_KEY].startswith(f"nchwc{BLOCK}")
    assert _compare(small_onnx, native_library, data) < 1e-5


def test_squeeze_excite_moves_too(tmp_path: Path, native_library: Path) -> None:
    """MobileNetV3's block: GroupNorm + HardSwish, squeeze-excite (mean, two 1x1 convolutions, HardSigmoid
    gate, Mul), projection GroupNorm + residual: nothing left on the plain layout but the head's pooling."""
    from torchvision.ops import SqueezeExcitation

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.Hardswish(),
                        SqueezeExcitation(32, 8, scale_activation=nn.Hardsigmoid), nn.Conv2d(32, 32, 1),
                        nn.GroupNorm(8, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    path = tmp_path / "se.onnx"
    export_onnx(net, path, input_shape=(1, 3, 32, 32))
    data, fused = nchwc.nchwc_model(path, native_library)
    ops = collections.Counter((n.domain, n.op_type) for n in onnx.load_from_string(data).graph.node)
    assert fused == 2 and ops[(nchwc.OP_DOMAIN, blocked_layout.SCALE_OP)] == 1
    assert ops[(nchwc.NCHWC_DOMAIN, "GlobalAveragePool")] == 2  # squeeze-excite's mean and the head's
    assert ops[("", "ReduceMean")] == 0 and ops[("", "Mul")] == 0 and ops[(nchwc.NCHWC_DOMAIN, "ReorderInput")] == 0
    assert _compare(path, native_library, data) < 1e-5


@pytest.mark.parametrize("tap", ["conv", "mean"])
def test_input_read_elsewhere_is_not_overwritten(tmp_path: Path, native_library: Path, tap: str) -> None:
    path = tmp_path / "tap.onnx"
    export_onnx(small_net(tap=tap), path, input_shape=(1, 3, 32, 32))
    data, fused = nchwc.nchwc_model(path, native_library)
    assert fused == 5  # the tapped block's GroupNorm stays on the plain kernel
    assert _ops(data)["GroupNorm"] == 1
    assert _compare(path, native_library, data) < 1e-5


def test_groupnorm_outputs_stay_readable(small_onnx: Path, native_library: Path) -> None:
    """Parity's localisation adds every GroupNorm output as a graph output: each must stay exact."""
    model = onnx.load(str(small_onnx))
    taps = [n.output[0] for n in model.graph.node if n.op_type == "GroupNorm"]
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in taps)
    plain = open_session(model.SerializeToString(), library=native_library, blocked=False)
    blocked = open_session(model.SerializeToString(), library=native_library, blocked=True)
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for want, got in zip(plain.run(None, {"input": x}), blocked.run(None, {"input": x})):
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_rewrite_that_changes_the_output_is_refused(small_onnx: Path, native_library: Path, monkeypatch) -> None:
    monkeypatch.setenv(nchwc_cache.NO_CACHE_VAR, "1")  # the rewrite itself, not a cached one
    original = blocked_layout.rewrite

    def wrong(model: onnx.ModelProto, block: int) -> int:
        fused = original(model, block)
        node = next(n for n in model.graph.node if n.op_type == nchwc.FUSED_OP)
        next(a for a in node.attribute if a.name == "num_groups").i = 1  # a different normalisation
        return fused

    monkeypatch.setattr(blocked_layout, "rewrite", wrong)
    with pytest.raises(NativeBuildError, match="changed the model's output"):
        nchwc.nchwc_model(small_onnx, native_library)
    with pytest.raises(NativeBuildError, match="blocked layout"):
        open_session(small_onnx, library=native_library, blocked=True)
    fallback = open_session(small_onnx, library=native_library)  # default: the plain kernel, not the wrong graph
    plain = open_session(small_onnx, library=native_library, blocked=False)
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(fallback.run(None, {"input": x})[0], plain.run(None, {"input": x})[0])


def test_no_blocked_layout_falls_back(small_onnx: Path, native_library: Path, monkeypatch) -> None:
    monkeypatch.setenv(nchwc_cache.NO_CACHE_VAR, "1")  # a CPU without the layout: the cache's key covers it here
    monkeypatch.setattr(nchwc, "block_size", lambda: 1)
    with pytest.raises(NativeBuildError, match="no blocked"):
        nchwc.nchwc_model(small_onnx, native_library)
    sess = open_session(small_onnx, library=native_library)
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert np.isfinite(sess.run(None, {"input": x})[0]).all()


def test_model_without_groupnorm_is_returned_as_is(tmp_path: Path, native_library: Path) -> None:
    path = tmp_path / "conv.onnx"
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU()).eval()
    export_onnx(net, path, input_shape=(1, 3, 16, 16), allow_batchnorm=True)
    data, fused = nchwc.nchwc_model(path, native_library)
    assert fused == 0 and _ops(data)[nchwc.FUSED_OP] == 0


def test_cli_writes_the_blocked_model(small_onnx: Path, native_library: Path, tmp_path: Path, capsys) -> None:
    from gn_convert.cli import main

    out = tmp_path / "small.blocked.onnx"
    assert main(["native", "--blocked", str(small_onnx), "-o", str(out)]) == 0
    assert _ops(out.read_bytes())[nchwc.FUSED_OP] == 6
    assert "6 GroupNorm layers on onnxruntime's blocked layout" in capsys.readouterr().err
    assert _compare(small_onnx, native_library, out.read_bytes()) < 1e-5


def test_cli_never_writes_the_blocked_model_over_its_input(small_onnx: Path, native_library: Path, tmp_path: Path,
                                                           error_line) -> None:
    """Defect: ``--output`` equal to the model replaced the portable file with one valid on this CPU only."""
    from gn_convert.cli import main

    model = tmp_path / "m.onnx"
    model.write_bytes(small_onnx.read_bytes())
    assert main(["native", "--blocked", str(model), "-o", str(tmp_path / "." / "m.onnx")]) == 2
    assert "is the model itself" in error_line() and model.read_bytes() == small_onnx.read_bytes()


@pytest.mark.parametrize("problem", ["missing", "no groupnorm", "corrupt"])
def test_cli_blocked_bad_input(problem: str, native_library: Path, tmp_path: Path, error_line) -> None:
    from gn_convert.cli import main

    model, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    if problem == "no groupnorm":
        net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU()).eval()
        export_onnx(net, model, input_shape=(1, 3, 16, 16), allow_batchnorm=True)
    elif problem == "corrupt":
        model.write_bytes(b"not an onnx file")
    assert main(["native", "--blocked", str(model), "-o", str(out)]) == 2
    expected = {"missing": "not found", "no groupnorm": "no GroupNorm", "corrupt": "cannot load"}[problem]
    assert expected in error_line()
    assert not out.exists() and not list(tmp_path.glob("out.onnx*"))


@pytest.mark.parametrize("options, problem", [
    ({"level": "basic"}, "optimisation level 'all'"),
    ({"disabled_optimizers": ["NchwcTransformer"]}, "not disabled: NchwcTransformer"),
    ({"provider": "cuda"}, "the CPU provider"),
    ({"library": None}, "the native kernel library"),
])
def test_blocked_true_is_enforced_never_a_silent_plain_session(small_onnx: Path, options: dict, problem: str) -> None:
    kwargs = {"library": "libgn_convert_ops.so", **options}
    with pytest.raises(OptionError, match=f"blocked=True needs .*{re.escape(problem)}"):
        open_session(small_onnx, blocked=True, **kwargs)


def test_blocked_true_without_a_groupnorm_to_move_is_an_error(tmp_path: Path, native_library: Path) -> None:
    path = tmp_path / "conv.onnx"
    export_onnx(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16)).eval(), path, input_shape=(1, 3, 16, 16),
                allow_batchnorm=True)
    with pytest.raises(NativeBuildError, match="no GroupNorm of this model runs on the blocked layout"):
        open_session(path, library=native_library, blocked=True)
    assert open_session(path, library=native_library).get_providers()[0] == "CPUExecutionProvider"


class FakeInput:
    def __init__(self, name: str, type_: str, shape: list) -> None:
        self.name, self.type, self.shape = name, type_, shape


class FakeSession:
    """A session stand-in: y = x * scale (+ the integer input), wrong from ``wrong_from_batch`` on."""

    def __init__(self, wrong_from_batch: int = 0, fail: bool = False) -> None:
        self.wrong_from_batch, self.fail, self.feeds = wrong_from_batch, fail, []

    def get_inputs(self) -> list:
        return [FakeInput("x", "tensor(float)", ["batch", 4, "h", "w"]), FakeInput("k", "tensor(int64)", [1])]

    def run(self, _outputs, feeds: dict) -> list:
        if self.fail:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : shape mismatch\nsecond line")
        self.feeds.append({k: v.copy() for k, v in feeds.items()})
        y = feeds["x"] * 2 + feeds["k"]
        wrong = self.wrong_from_batch and feeds["x"].shape[0] >= self.wrong_from_batch
        return [y + 1 if wrong else y]


def test_self_check_feeds_every_input_at_two_batches_and_two_seeds() -> None:
    reference = FakeSession()
    assert nchwc.check_blocked(reference, FakeSession()) == 0.0
    assert [f["x"].shape[0] for f in reference.feeds] == [1, 1, 3, 3]
    assert all(f["k"].dtype == np.int64 and f["x"].shape[1:] == (4, 64, 64) for f in reference.feeds)
    assert not np.array_equal(reference.feeds[0]["x"], reference.feeds[1]["x"])  # two seeds


def test_self_check_catches_an_error_only_a_larger_batch_shows() -> None:
    with pytest.raises(NativeBuildError, match=r"changed the model's output .* batch 3, seed 0"):
        nchwc.check_blocked(FakeSession(), FakeSession(wrong_from_batch=2))


def test_self_check_turns_onnxruntime_failures_into_one_line() -> None:
    expected = r"cannot check the blocked-layout rewrite: onnxruntime failed on a random input \(batch 1\): .*shape mismatch$"
    with pytest.raises(NativeBuildError, match=expected):
        nchwc.check_blocked(FakeSession(), FakeSession(fail=True))


@pytest.mark.parametrize("attributes, alpha", [({}, 1.702), ({"alpha": 1.0}, 1.0)])
def test_quick_gelu_without_alpha_takes_the_contrib_schema_default(attributes: dict, alpha: float) -> None:
    gelu = helper.make_node("QuickGelu", ["y"], ["z"], domain="com.microsoft", **attributes)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), gelu], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])])
    nodes, attrs = blocked_layout._Rewrite(helper.make_model(graph)).activation("y")
    assert nodes == [gelu] and attrs == {"activation": "QuickGelu", "alpha": pytest.approx(alpha)}
