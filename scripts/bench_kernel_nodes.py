"""Per-call cost of the blocked GroupNorm kernel against onnxruntime's own Relu, on one tensor shape.

Builds two chains of nodes on the same blocked tensor ``[N, C, H, W]`` (C a multiple of this CPU's
NCHWc block): ``GroupNormNchwc`` (G = the converter's choice for C at ``--groups``, with Relu
fused) and onnxruntime's ``Relu``, once with one node and once with ``--nodes + 1``, and prints the
microseconds per node: (time of the long chain - time of the short one) / nodes, the 25th
percentile over ``--reps`` runs. Relu is the floor for an op that reads and writes the tensor once;
GroupNorm reads it twice (statistics, then normalisation) and writes it once. The shapes by default
are MobileNetV3-Large's (scripts/PERF.md, "Mobile nets on the blocked kernel").

Usage::

    python scripts/bench_kernel_nodes.py --threads 2
    python scripts/bench_kernel_nodes.py --shapes 1x960x7x7,8x960x7x7 --threads 1
    python scripts/bench_kernel_nodes.py --libraries wheel=WHEEL_LIB.so,local=$(gn-convert native)

With ``--libraries``, one GroupNorm column per library, each timed twice per shape in the order
A B ... B A (drift on a shared machine falls on both alike) and averaged.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from gn_convert.native import build_library
from gn_convert.native.build import kernel_isa, library_target
from gn_convert.native.nchwc import block_size
from gn_convert.onnx.passes.blocked_layout import FUSED_OP, OP_DOMAIN
from gn_convert.runtime import session_options
from gn_convert.surgery.group_count import choose_groups

SHAPES = "1x16x112x112,1x64x112x112,1x672x14x14,1x960x7x7,8x64x112x112,8x672x14x14,8x960x7x7"


def chain(op: str, nodes: int, shape: list[int], groups: int, block: int) -> bytes:
    """A model of ``nodes`` ``op`` nodes (``gn`` or ``relu``) in a row on a tensor of ``shape``."""
    channels = shape[1]
    graph_nodes, prev = [], "x"
    for i in range(nodes):
        out = "y" if i == nodes - 1 else f"h{i}"
        if op == "gn":
            graph_nodes.append(helper.make_node(FUSED_OP, [prev, "scale", "bias"], [out], domain=OP_DOMAIN,
                                                num_groups=groups, epsilon=1e-5, channels=channels, block=block,
                                                activation="Relu"))
        else:
            graph_nodes.append(helper.make_node("Relu", [prev], [out]))
        prev = out
    inits = [helper.make_tensor(name, TensorProto.FLOAT, [channels], np.full(channels, value, np.float32))
             for name, value in (("scale", 1.0), ("bias", 0.0))]
    graph = helper.make_graph(graph_nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(OP_DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def per_node_us(op: str, shape: list[int], groups: int, *, nodes: int, reps: int, threads: int, library: str,
                block: int) -> float:
    """Microseconds per node of ``op`` on ``shape``: the long chain's time less the one-node chain's."""
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    times = {}
    for count in (1, nodes + 1):
        options = session_options(threads=threads, spinning=False, library=library)
        session = ort.InferenceSession(chain(op, count, shape, groups, block), options,
                                       providers=["CPUExecutionProvider"])
        for _ in range(10):
            session.run(None, {"x": x})
        runs = []
        for _ in range(reps):
            start = time.perf_counter()
            session.run(None, {"x": x})
            runs.append(time.perf_counter() - start)
        times[count] = float(np.percentile(runs, 25))
    return (times[nodes + 1] - times[1]) * 1e6 / nodes


def main() -> None:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=SHAPES, help=f"NxCxHxW,... (default {SHAPES})")
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nodes", type=int, default=50)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--libraries", metavar="LABEL=PATH,...",
                   help="time GroupNorm with each of these kernel libraries (default: the build for this CPU)")
    args = p.parse_args()
    block = block_size()
    if block not in (8, 16):
        raise SystemExit("bench_kernel_nodes: this CPU has no NCHWc layout in onnxruntime; nothing to time")
    pairs = [item.split("=", 1) for item in (args.libraries or "").split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"bench_kernel_nodes: --libraries {args.libraries!r}: expected LABEL=PATH,...")
    libraries = {label: path for label, path in pairs} or {"GroupNorm": str(build_library())}
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), NCHWc block {block}, spinning off; "
          f"us per node, 25th percentile of {args.reps} runs of a chain of {args.nodes}")
    for label, path in libraries.items():
        print(f"  {label}: {path} ({kernel_isa(path)} kernels, {library_target(path)})")
    print(f"{'shape':>16} {'G':>4} {'MB':>6} {'Relu':>8} " + " ".join(f"{label:>10} {'ratio':>6}" for label in libraries))
    for text in args.shapes.split(","):
        shape = [int(v) for v in text.split("x")]
        if shape[1] % block:
            raise SystemExit(f"bench_kernel_nodes: {text}: C must be a multiple of the block ({block})")
        groups, _ = choose_groups(shape[1], args.groups)
        common = {"nodes": args.nodes, "reps": args.reps, "threads": args.threads, "block": block}
        relu = per_node_us("relu", shape, groups, library=next(iter(libraries.values())), **common)
        order = [*libraries, *reversed(libraries)] if len(libraries) > 1 else list(libraries)
        times: dict[str, list[float]] = {label: [] for label in libraries}
        for label in order:
            times[label].append(per_node_us("gn", shape, groups, library=libraries[label], **common))
        cells = " ".join(f"{np.mean(t):>10.1f} {np.mean(t) / relu:>5.2f}x" for t in times.values())
        print(f"{text:>16} {groups:>4} {np.prod(shape) * 4 / 1e6:>6.1f} {relu:>8.1f} {cells}", flush=True)


if __name__ == "__main__":
    main()
