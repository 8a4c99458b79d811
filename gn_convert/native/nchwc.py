"""GroupNorm on onnxruntime's blocked layout: a graph for this machine with no reorders around it.

onnxruntime's CPU provider runs convolutions on a blocked layout (NCHWc: ``[N][C/B][H][W][B]``,
B = 8 or 16 by CPU) and, since it has no blocked kernel for a normalisation, reorders every
GroupNorm's input out of that layout and its output (after the Relu or residual Add + Relu,
which no longer fuse into the convolution) back in. Those reorders are about half of what a
GroupNorm network costs over its BatchNorm original (``scripts/PERF.md``).

:func:`nchwc_model` lets onnxruntime optimise the model once, with the native kernel library
registered, takes the optimised graph it writes (its blocked convolutions and reorders), and
replaces each ``ReorderOutput -> GroupNorm [-> Add] [-> Relu] -> ReorderInput`` chain by one
``ai.gn_convert::GroupNormNchwc`` node that reads and writes the blocked tensor, with the Add and
Relu fused (:func:`fuse_groupnorm_nchwc`). The result is for this CPU and this onnxruntime only
(the block size and the reordered weights are baked in), like any model onnxruntime optimised
offline: make it where it runs. Its metadata says so (``gn_convert.layout``).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from gn_convert.errors import NativeBuildError, SessionError, first_line

log = logging.getLogger(__name__)

NCHWC_DOMAIN = "com.microsoft.nchwc"
OP_DOMAIN = "ai.gn_convert"
FUSED_OP = "GroupNormNchwc"
LAYOUT_KEY = "gn_convert.layout"


@functools.lru_cache(maxsize=None)
def block_size() -> int:
    """onnxruntime's NCHWc block size on this CPU (8 with AVX2, 16 with AVX-512; 1: none).

    Measured, not guessed: one ``ReorderInput`` of four channels pads them to the block.
    """
    import onnxruntime as ort

    node = helper.make_node("ReorderInput", ["x"], ["y"], domain=NCHWC_DOMAIN)
    graph = helper.make_graph([node], "block", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 1, 1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(NCHWC_DOMAIN, 1)])
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return int(sess.run(None, {"x": np.ones((1, 4, 1, 1), np.float32)})[0].shape[1])
    except Exception as err:  # no NCHWc kernels in this build or on this CPU
        log.info("no NCHWc layout here: %s", first_line(err))
        return 1


def optimized_graph(model: str | Path | bytes, library: str | Path) -> tuple[onnx.ModelProto, Any]:
    """The graph onnxruntime runs for ``model`` on this CPU, with the kernel library registered,
    and the session that made it."""
    import onnxruntime as ort

    from gn_convert.runtime import session_options

    with tempfile.TemporaryDirectory(prefix="gn-nchwc-") as tmp:
        options = session_options(threads=1, level="all", library=library)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own types: Fail, InvalidGraph, NoSuchFile, ...
            what = "the model" if isinstance(model, bytes) else str(model)
            raise SessionError(f"onnxruntime cannot load {what}: {first_line(err)}") from err
        return onnx.load(options.optimized_model_filepath), session


@dataclass
class _Graph:
    """Producer and consumer maps of a graph's nodes, by value name."""

    model: onnx.ModelProto

    def __post_init__(self) -> None:
        self.producer = {out: node for node in self.model.graph.node for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in self.model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {value.name for value in self.model.graph.output}

    def sole_consumer(self, name: str, op_type: str, domain: str = "") -> Any | None:
        """The one node reading ``name`` if it is ``op_type`` and ``name`` is not a graph output."""
        users = self.consumers.get(name, [])
        if len(users) == 1 and users[0].op_type == op_type and users[0].domain == domain and name not in self.outputs:
            return users[0]
        return None

    def activation(self, name: str) -> tuple[list[Any], dict[str, Any]]:
        """The activation reading ``name`` that GroupNormNchwc can fuse: its nodes and the op's attributes.

        Relu; QuickGelu (onnxruntime's fusion of ``x * sigmoid(alpha x)``, SiLU); HardSwish, as
        onnxruntime leaves it (``HardSigmoid`` and ``Mul`` both reading ``name``) or as one node.
        """
        if name in self.outputs:
            return [], {}
        if (node := self.sole_consumer(name, "Relu")) is not None:
            return [node], {"activation": "Relu"}
        if (node := self.sole_consumer(name, "QuickGelu", "com.microsoft")) is not None:
            return [node], {"activation": "QuickGelu", "alpha": _attr(node, "alpha", 1.0)}
        if (node := self.sole_consumer(name, "HardSwish")) is not None:
            return [node], {"activation": "HardSwish", "alpha": 1.0 / 6.0, "beta": 0.5}
        users = self.consumers.get(name, [])
        gate = next((u for u in users if u.op_type == "HardSigmoid" and u.domain == ""), None)
        if len(users) == 2 and gate is not None and gate.output[0] not in self.outputs:
            mul = self.sole_consumer(gate.output[0], "Mul")
            if mul is not None and mul in users and set(mul.input) == {name, gate.output[0]}:
                return [gate, mul], {"activation": "HardSwish", "alpha": _attr(gate, "alpha", 0.2),
                                     "beta": _attr(gate, "beta", 0.5)}
        return [], {}


def fuse_groupnorm_nchwc(model: onnx.ModelProto, block: int) -> int:
    """Replace each reordered GroupNorm chain of onnxruntime's optimised graph by GroupNormNchwc.

    Args:
        model: the graph :func:`optimized_graph` returned; edited in place.
        block: :func:`block_size`.

    Returns:
        The number of GroupNorm nodes now computed on the blocked layout.
    """
    graph = _Graph(model)
    blocked: dict[str, str] = {}  # NCHW value -> the same value on the blocked layout
    for node in graph.model.graph.node:
        if node.domain == NCHWC_DOMAIN and node.op_type == "ReorderOutput":
            blocked[node.output[0]] = node.input[0]
        elif node.domain == NCHWC_DOMAIN and node.op_type == "ReorderInput":
            blocked.setdefault(node.input[0], node.output[0])
    new_nodes, dropped, fused = [], set(), 0
    for node in list(graph.model.graph.node):
        if id(node) in dropped:
            continue
        source = graph.producer.get(node.input[0]) if node.input else None
        if not (node.domain == OP_DOMAIN and node.op_type == "GroupNorm" and source is not None
                and source.domain == NCHWC_DOMAIN and source.op_type == "ReorderOutput"
                and _private(graph, source.input[0], source)):
            new_nodes.append(node)
            continue
        chain, residual, tail = [node], None, node.output[0]
        add = graph.sole_consumer(tail, "Add")
        if add is not None:
            other = add.input[1] if add.input[0] == tail else add.input[0]
            if other in blocked:
                chain, residual, tail = chain + [add], blocked[other], add.output[0]
        act_nodes, act = graph.activation(tail)
        if act_nodes:
            chain, tail = chain + act_nodes, act_nodes[-1].output[0]
        channels = _attr(source, "channels", 0)
        out = blocked.get(tail, f"{tail}__nchwc")
        inputs = [source.input[0], node.input[1], node.input[2]] + ([residual] if residual else [])
        new_nodes.append(helper.make_node(FUSED_OP, inputs, [out], name=f"{node.name or tail}_nchwc", domain=OP_DOMAIN,
                                          num_groups=_attr(node, "num_groups", 0), epsilon=_attr(node, "epsilon", 1e-5),
                                          channels=channels, block=block, **{"activation": "", **act}))
        dropped.update(id(n) for n in chain[1:])
        fused += 1
        for user in graph.consumers.get(tail, []):
            if user.domain == NCHWC_DOMAIN and user.op_type == "ReorderInput":
                _rename_input(graph, user.output[0], out)
                dropped.add(id(user))
        blocked[tail] = out
        if any(id(u) not in dropped for u in graph.consumers.get(tail, [])) or tail in graph.outputs:
            new_nodes.append(helper.make_node("ReorderOutput", [out], [tail], domain=NCHWC_DOMAIN,
                                              channels=channels, channels_last=0))
    del graph.model.graph.node[:]
    graph.model.graph.node.extend(_sorted(_live(new_nodes, graph.outputs)))
    return fused


def _attr(node: Any, name: str, default: Any) -> Any:
    """A node attribute's value, or ``default``."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _private(graph: _Graph, name: str, reader: Any) -> bool:
    """Whether ``reader`` is the only node reading ``name``, a value made by a node: GroupNormNchwc
    writes its result over its input (an alias), so nothing else may read that input."""
    return (name in graph.producer and name not in graph.outputs
            and all(user is reader for user in graph.consumers.get(name, [])))


def _rename_input(graph: _Graph, old: str, new: str) -> None:
    """Make every reader of ``old`` read ``new``."""
    if old == new:
        return
    for user in graph.consumers.get(old, []):
        for i, name in enumerate(user.input):
            if name == old:
                user.input[i] = new
        graph.consumers.setdefault(new, []).append(user)


def _live(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """``nodes`` without reorders whose outputs nobody reads (repeated until none is left)."""
    while True:
        read = {name for node in nodes for name in node.input} | outputs
        kept = [n for n in nodes if not (n.domain == NCHWC_DOMAIN and n.op_type.startswith("Reorder")
                                           and not any(o in read for o in n.output))]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


def _sorted(nodes: list[Any]) -> list[Any]:
    """``nodes`` in an order where every value is produced before it is read (stable otherwise)."""
    made = {out for node in nodes for out in node.output}
    ready: set[str] = set()
    done, pending = [], list(nodes)
    while pending:
        waiting = []
        for node in pending:
            if all(name in ready or name not in made for name in node.input if name):
                done.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError("the rewritten graph has a cycle")
        pending = waiting
    return done


def nchwc_model(model: str | Path | bytes, library: str | Path) -> tuple[bytes, int]:
    """``model`` optimised by onnxruntime for this CPU, its GroupNorms on the blocked layout.

    Args:
        model: a gn-convert ONNX file (or its bytes) with ``ai.gn_convert::GroupNorm`` nodes.
        library: the native kernel library (:func:`gn_convert.native.build_library`).

    Returns:
        The serialised model, to open with the same library and any optimisation level, and the
        number of GroupNorm nodes moved onto the blocked layout (0: nothing to gain here).

    The rewritten model is checked against onnxruntime's own on one random input
    (:data:`SELF_CHECK_TOLERANCE`).

    Raises:
        NativeBuildError: this CPU or onnxruntime has no NCHWc layout, or the check failed.
        SessionError: onnxruntime cannot load ``model``.
    """
    block = block_size()
    if block not in (8, 16):
        raise NativeBuildError(f"onnxruntime has no blocked (NCHWc) layout on this CPU (block {block}); "
                               "use the native kernel on the model as it is")
    optimized, reference = optimized_graph(model, library)
    fused = fuse_groupnorm_nchwc(optimized, block)
    if not any(o.domain == OP_DOMAIN for o in optimized.opset_import):
        optimized.opset_import.append(helper.make_opsetid(OP_DOMAIN, 1))
    entry = optimized.metadata_props.add()
    entry.key, entry.value = LAYOUT_KEY, f"nchwc{block} (this CPU and onnxruntime only; rebuild elsewhere)"
    data = optimized.SerializeToString()
    if fused:
        _self_check(reference, data, library)
    log.info("%d GroupNorm layers on the blocked layout (block %d)", fused, block)
    return data, fused


SELF_CHECK_TOLERANCE = 1e-3
"""Largest error of the rewritten model on a random input, relative to the output's largest value:
float32 rounding differs by about 1e-6; a layout mistake gives errors near 1."""


def _self_check(reference: Any, data: bytes, library: str | Path) -> None:
    """Run the rewritten model and onnxruntime's own on one random input; raise if they differ."""
    import onnxruntime as ort

    from gn_convert.runtime import session_options

    feeds = {}
    for value in reference.get_inputs():
        if value.type != "tensor(float)":
            return  # nothing to draw: the check is skipped, as for any model we cannot feed
        shape = [d if isinstance(d, int) and d > 0 else (1 if k == 0 else 64) for k, d in enumerate(value.shape)]
        feeds[value.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    rewritten = ort.InferenceSession(data, session_options(threads=1, level="all", library=library),
                                     providers=["CPUExecutionProvider"])
    for want, got in zip(reference.run(None, feeds), rewritten.run(None, feeds)):
        want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
        error = float(np.abs(want - got).max() / max(np.abs(want).max(), 1e-6)) if want.size else 0.0
        if not error <= SELF_CHECK_TOLERANCE:
            raise NativeBuildError(f"the blocked-layout rewrite changed the model's output (relative error {error:.1e} "
                                   "on a random input); open the model without it (blocked=False) and report this")
