"""One-node models of the ``ai.gn_convert::GroupNorm`` op, their inputs and a float64 reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnxruntime as ort
import torch

from gn_convert.onnx.lowering.function import attach_function
from gn_convert.onnx.op import DOMAIN, OP_TYPE, opset_import

LEVELS = {"opt-off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "opt-all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
FP32_BOUND = 2e-6
"""Relative error bound for float32 inputs with mean 0 (rounding of a few float32 ops)."""
FP32_MEAN1000_BOUND = 5e-4
"""Relative bound at mean 1000 and std 1: float32 resolves 1000 to 6e-5, i.e. ~1e-4 of the output."""
FP16_BOUND = 1e-3
"""Relative bound for float16 inputs: one float16 rounding of the output (2^-11) plus float32 compute."""

SHAPES_GROUPS = [
    ((2, 6, 17), 1), ((2, 6, 17), 6), ((2, 6, 17), 3),                  # rank 3
    ((3, 8, 5, 7), 1), ((3, 8, 5, 7), 8), ((3, 8, 5, 7), 4),             # rank 4
    ((2, 4, 3, 4, 5), 1), ((2, 4, 3, 4, 5), 4), ((2, 4, 3, 4, 5), 2),    # rank 5
]


def shape_id(value: object) -> str:
    """pytest id of a shape (``2x6x17``) or a group count (``G3``)."""
    return "x".join(map(str, value)) if isinstance(value, tuple) else f"G{value}"


def one_node_model(shape: tuple[int, ...], groups: int, eps: float | None, dtype: int, opset: int = 21,
                   op: str = "custom") -> onnx.ModelProto:
    """A one-node model: Y = GroupNorm(X, scale, bias), all three graph inputs."""
    channels = shape[1]
    attrs = {"num_groups": groups}
    if eps is not None:
        attrs["epsilon"] = eps
    if op == "custom":
        node = oh.make_node(OP_TYPE, ["X", "scale", "bias"], ["Y"], domain=DOMAIN, **attrs)
        imports = [oh.make_opsetid("", opset), opset_import()]
    else:  # the standard GroupNormalization-21
        node = oh.make_node("GroupNormalization", ["X", "scale", "bias"], ["Y"], **attrs)
        imports = [oh.make_opsetid("", 21)]
    graph = oh.make_graph(
        [node], "groupnorm",
        [oh.make_tensor_value_info("X", dtype, ["N", *shape[1:]]),
         oh.make_tensor_value_info("scale", dtype, [channels]),
         oh.make_tensor_value_info("bias", dtype, [channels])],
        [oh.make_tensor_value_info("Y", dtype, ["N", *shape[1:]])],
    )
    model = oh.make_model(graph, opset_imports=imports)
    return attach_function(model) if op == "custom" else model


def behind_identity_conv(model: onnx.ModelProto, feeds: dict[str, np.ndarray], conv_after: bool = False) -> onnx.ModelProto:
    """``model`` (a one-node model of :func:`one_node_model`) reading ``X`` through a 1x1 identity Conv
    (and, with ``conv_after``, writing ``Y`` through another), with ``feeds``' scale and bias as
    initializers: onnxruntime then runs the call on its blocked NCHWc layout where it can (the Conv's
    output is blocked), and the result is unchanged (an identity Conv is exact in float32). :func:`run`
    feeds it ``X`` alone."""
    wrapped = onnx.ModelProto()
    wrapped.CopyFrom(model)
    graph, channels = wrapped.graph, feeds["X"].shape[1]
    for node in graph.node:
        node.input[:] = ["X_conv" if name == "X" else name for name in node.input]
        node.output[:] = ["Y_norm" if name == "Y" and conv_after else name for name in node.output]
    graph.initializer.extend([
        onh.from_array(np.eye(channels, dtype=np.float32).reshape(channels, channels, 1, 1), "identity_w"),
        onh.from_array(feeds["scale"], "scale"), onh.from_array(feeds["bias"], "bias"),
    ])
    keep = [value for value in graph.input if value.name == "X"]
    del graph.input[:]
    graph.input.extend(keep)
    graph.node.insert(0, oh.make_node("Conv", ["X", "identity_w"], ["X_conv"], name="identity"))
    if conv_after:
        graph.node.append(oh.make_node("Conv", ["Y_norm", "identity_w"], ["Y"], name="identity_after"))
    return wrapped


def inputs(shape: tuple[int, ...], mean: float, dtype: np.dtype, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded X (normal, shifted by ``mean``), scale in [0.5, 2] and bias in [-1, 1]."""
    rng = np.random.default_rng(seed)
    channels = shape[1]
    return {
        "X": (rng.standard_normal(shape) + mean).astype(dtype),
        "scale": rng.uniform(0.5, 2.0, channels).astype(dtype),
        "bias": rng.uniform(-1.0, 1.0, channels).astype(dtype),
    }


def reference(feeds: dict[str, np.ndarray], groups: int, eps: float) -> np.ndarray:
    """torch's group_norm on float64 copies of ``feeds``."""
    t = {k: torch.from_numpy(v.astype(np.float64)) for k, v in feeds.items()}
    return torch.nn.functional.group_norm(t["X"], groups, t["scale"], t["bias"], eps).numpy()


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], level: ort.GraphOptimizationLevel) -> np.ndarray:
    """Run ``model`` on onnxruntime's CPU provider, one thread (on the feeds its inputs name)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = {value.name for value in session.get_inputs()}
    return session.run(None, {name: value for name, value in feeds.items() if name in names})[0]


def relative_error(feeds: dict[str, np.ndarray], groups: int, eps: float, model: onnx.ModelProto,
                   level: ort.GraphOptimizationLevel) -> float:
    """Max abs error of onnxruntime vs float64 torch, over the reference output's max magnitude."""
    got = run(model, feeds, level).astype(np.float64)
    ref = reference(feeds, groups, eps)
    return float(np.abs(got - ref).max() / np.abs(ref).max())
