"""The blocked-layout graph passes behind :mod:`gn_convert.native.nchwc`: onnxruntime's optimised graph,
edited so that GroupNorm, the Add and activation after it, and squeeze-excite run on the blocked layout.
Pure ONNX: it reads and writes ``onnx.ModelProto`` and imports nothing of onnxruntime.

onnxruntime's graph marks the layout with its reorders: ``ReorderOutput`` (blocked -> plain, with
the real channel count) and ``ReorderInput`` (plain -> blocked). Each pass replaces plain-layout
ops that sit between reorders by blocked ones, records for each plain value the name of its
blocked twin, redirects readers of a ``ReorderInput`` to that twin, and puts a ``ReorderOutput``
back only where a plain-layout op still reads the value; :func:`_live` then drops reorders that
nothing reads.

- :func:`fuse_groupnorm` (``GroupNormNchwc``): ``ReorderOutput -> GroupNorm [-> Add] [-> Relu |
  HardSigmoid + Mul (HardSwish) | QuickGelu (SiLU)]``.
- :func:`fuse_squeeze_excite`: a spatial ``ReduceMean`` of a blocked value becomes onnxruntime's
  blocked ``GlobalAveragePool``; the ``Mul`` of that value by the gate computed from its mean
  becomes ``ScaleNchwc``.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

NCHWC_DOMAIN = "com.microsoft.nchwc"
OP_DOMAIN = "ai.gn_convert"
FUSED_OP = "GroupNormNchwc"
SCALE_OP = "ScaleNchwc"
QUICK_GELU_ALPHA = 1.702
"""``com.microsoft.QuickGelu``'s ``alpha`` when the node has none (its contrib schema's default;
onnxruntime's SiLU fusion writes 1.0 explicitly)."""
_GATE_DEPTH = 8
"""Most nodes between a squeeze (the mean) and the gate that multiplies (convolutions, activations, reorders)."""


class _Rewrite:
    """One pass over a graph: producer and consumer maps, blocked twins, the nodes kept or made."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        nodes = list(model.graph.node)
        self.producer = {out: node for node in nodes for out in node.output}
        self.consumers: dict[str, list[Any]] = {}
        for node in nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.outputs = {value.name for value in model.graph.output}
        self.blocked: dict[str, str] = {}  # plain value -> its blocked twin
        for node in nodes:
            if _is(node, "ReorderOutput", NCHWC_DOMAIN):
                self.blocked[node.output[0]] = node.input[0]
            elif _is(node, "ReorderInput", NCHWC_DOMAIN):
                self.blocked.setdefault(node.input[0], node.output[0])
        self.nodes: list[Any] = []
        self.dropped: set[int] = set()

    def sole_consumer(self, name: str, op_type: str, domain: str = "") -> Any | None:
        """The one node reading ``name`` if it is ``op_type`` and ``name`` is not a graph output."""
        users = self.consumers.get(name, [])
        if len(users) == 1 and _is(users[0], op_type, domain) and name not in self.outputs:
            return users[0]
        return None

    def channels(self, plain: str) -> int | None:
        """The real channel count of a plain value made by a ``ReorderOutput``."""
        node = self.producer.get(plain)
        return _attr(node, "channels", None) if node is not None and _is(node, "ReorderOutput", NCHWC_DOMAIN) else None

    def hand_over(self, plain: str, twin: str, channels: int) -> None:
        """``plain`` is now made as ``twin`` on the blocked layout: readers of its ``ReorderInput``
        read ``twin``; a ``ReorderOutput`` makes ``plain`` again if a plain-layout op still reads it."""
        for user in self.consumers.get(plain, []):
            if _is(user, "ReorderInput", NCHWC_DOMAIN) and id(user) not in self.dropped:
                self.rename(user.output[0], twin)
                self.dropped.add(id(user))
        self.blocked[plain] = twin
        if any(id(u) not in self.dropped for u in self.consumers.get(plain, [])) or plain in self.outputs:
            self.nodes.append(helper.make_node("ReorderOutput", [twin], [plain], domain=NCHWC_DOMAIN,
                                               channels=channels, channels_last=0))

    def rename(self, old: str, new: str) -> None:
        """Make every reader of ``old`` read ``new``."""
        if old == new:
            return
        for user in list(self.consumers.get(old, [])):
            for i, name in enumerate(user.input):
                if name == old:
                    user.input[i] = new
            self.consumers.setdefault(new, []).append(user)

    def private(self, name: str, reader: Any) -> bool:
        """Whether ``reader`` is the only node reading ``name``, a value made by a node:
        GroupNormNchwc writes its result over its input, so nothing else may read that input."""
        return (name in self.producer and name not in self.outputs
                and all(user is reader for user in self.consumers.get(name, [])))

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
            return [node], {"activation": "QuickGelu", "alpha": _attr(node, "alpha", QUICK_GELU_ALPHA)}
        if (node := self.sole_consumer(name, "HardSwish")) is not None:
            return [node], {"activation": "HardSwish", "alpha": 1.0 / 6.0, "beta": 0.5}
        users = self.consumers.get(name, [])
        gate = next((u for u in users if _is(u, "HardSigmoid")), None)
        if len(users) == 2 and gate is not None and gate.output[0] not in self.outputs:
            mul = self.sole_consumer(gate.output[0], "Mul")
            if mul is not None and mul in users and set(mul.input) == {name, gate.output[0]}:
                return [gate, mul], {"activation": "HardSwish", "alpha": _attr(gate, "alpha", 0.2),
                                     "beta": _attr(gate, "beta", 0.5)}
        return [], {}

    def finish(self) -> None:
        """Write the kept and made nodes back, without dead reorders, in a valid order."""
        del self.model.graph.node[:]
        self.model.graph.node.extend(_sorted(_live(self.nodes, self.outputs)))


def rewrite(model: onnx.ModelProto, block: int) -> int:
    """Both passes on onnxruntime's optimised graph (edited in place); the number of GroupNorms moved."""
    fused = fuse_groupnorm(model, block)
    fuse_squeeze_excite(model, block)
    return fused


def fuse_groupnorm(model: onnx.ModelProto, block: int) -> int:
    """Replace each reordered GroupNorm chain by one GroupNormNchwc node; how many were replaced."""
    pass_ = _Rewrite(model)
    fused = 0
    for node in model.graph.node:
        if id(node) in pass_.dropped:
            continue
        source = pass_.producer.get(node.input[0]) if node.input else None
        # written over its input: only where the GroupNorm is the one reader of the value, in both layouts
        if not (_is(node, "GroupNorm", OP_DOMAIN) and source is not None
                and _is(source, "ReorderOutput", NCHWC_DOMAIN) and pass_.private(source.input[0], source)
                and pass_.private(node.input[0], node)):
            pass_.nodes.append(node)
            continue
        chain, residual, tail = [node], None, node.output[0]
        add = pass_.sole_consumer(tail, "Add")
        if add is not None:
            other = add.input[1] if add.input[0] == tail else add.input[0]
            if other in pass_.blocked:
                chain, residual, tail = chain + [add], pass_.blocked[other], add.output[0]
        act_nodes, act = pass_.activation(tail)
        if act_nodes:
            chain, tail = chain + act_nodes, act_nodes[-1].output[0]
        channels = _attr(source, "channels", 0)
        out = pass_.blocked.get(tail, f"{tail}__nchwc")
        inputs = [source.input[0], node.input[1], node.input[2]] + ([residual] if residual else [])
        pass_.nodes.append(helper.make_node(
            FUSED_OP, inputs, [out], name=f"{node.name or tail}_nchwc", domain=OP_DOMAIN,
            num_groups=_attr(node, "num_groups", 0), epsilon=_attr(node, "epsilon", 1e-5), channels=channels,
            block=block, **{"activation": "", **act}))
        pass_.dropped.update(id(n) for n in chain[1:])
        fused += 1
        pass_.hand_over(tail, out, channels)
    pass_.finish()
    return fused


def fuse_squeeze_excite(model: onnx.ModelProto, block: int) -> int:
    """Move squeeze-excite's pooling and gating onto the blocked layout; how many ops were moved.

    A ``ReduceMean`` over height and width (keeping them) of a value with a blocked twin becomes
    ``com.microsoft.nchwc.GlobalAveragePool`` of the twin; a ``Mul`` of such a value by a gate that
    is computed from its mean (so one value per sample and channel) becomes ``ScaleNchwc``.
    """
    pass_ = _Rewrite(model)
    pooled: dict[str, str] = {}  # the mean -> the value it was taken of
    moved = 0
    for node in model.graph.node:
        if id(node) in pass_.dropped:
            continue
        if _is(node, "ReduceMean") and _spatial_mean(model, node) and node.input[0] in pass_.blocked \
                and (channels := pass_.channels(node.input[0])) is not None:
            twin = f"{node.output[0]}__nchwc"
            pass_.nodes.append(helper.make_node("GlobalAveragePool", [pass_.blocked[node.input[0]]], [twin],
                                                domain=NCHWC_DOMAIN))
            pooled[node.output[0]] = pooled[twin] = node.input[0]
            pass_.hand_over(node.output[0], twin, channels)
            moved += 1
            continue
        gated = _gated(pass_, node, pooled) if _is(node, "Mul") else None
        channels = pass_.channels(gated[0]) if gated is not None else None
        if gated is None or channels is None:
            pass_.nodes.append(node)
            continue
        value, gate = gated
        gate_producer = pass_.producer.get(gate)
        if gate_producer is not None and _is(gate_producer, "ReorderOutput", NCHWC_DOMAIN):
            gate = gate_producer.input[0]  # the blocked gate: [N, Cp, 1, 1] is [N][Cp] in memory as well
        twin = f"{node.output[0]}__nchwc"
        pass_.nodes.append(helper.make_node(SCALE_OP, [pass_.blocked[value], gate], [twin], domain=OP_DOMAIN,
                                            channels=channels, block=block))
        pass_.hand_over(node.output[0], twin, channels)
        moved += 1
    pass_.finish()
    return moved


def _gated(pass_: _Rewrite, mul: Any, pooled: dict[str, str]) -> tuple[str, str] | None:
    """``(value, gate)`` when ``mul`` multiplies a blocked value by a gate computed from its mean."""
    for value, gate in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        if value not in pass_.blocked or pass_.channels(value) is None:
            continue
        name = gate
        for _ in range(_GATE_DEPTH):
            if pooled.get(name) == value:
                return value, gate
            node = pass_.producer.get(name)
            if node is None or not node.input:
                break
            name = node.input[0]
    return None


def _spatial_mean(model: onnx.ModelProto, node: Any) -> bool:
    """Whether a ReduceMean averages a 4-D value over its last two axes and keeps them."""
    if _attr(node, "keepdims", 1) != 1:
        return False
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1:
        init = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
        axes = list(onnx.numpy_helper.to_array(init)) if init is not None else None
    return axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3]


def _is(node: Any, op_type: str, domain: str = "") -> bool:
    return bool(node.op_type == op_type and node.domain == domain)


def _attr(node: Any, name: str, default: Any) -> Any:
    """A node attribute's value, or ``default``."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


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
