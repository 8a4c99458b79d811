"""Where an ONNX model's time goes under onnxruntime's CPU provider: kernel time per op type.

Runs the model a few times with onnxruntime's profiler on, sums each node's kernel time by op
type, and prints the mean per run, largest first (the "where the time goes" tables of
scripts/PERF.md). ``--native`` registers gn-convert's native GroupNorm kernel; ``--blocked`` also
moves the GroupNorms onto onnxruntime's blocked layout (``gn_convert.native.nchwc``);
``--per-node OP`` prints each OP node's time, bytes out and effective bandwidth instead.

Usage::

    python scripts/profile_ops.py resnet50.function.onnx --native --batch 8
    python scripts/profile_ops.py resnet50.function.onnx --blocked --threads 2 --per-node GroupNormNchwc
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort


def profile(path: Path, *, batch: int, runs: int, threads: int, native: bool, blocked: bool = False,
            per_node: str | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Mean kernel milliseconds per run, by op type (or per ``per_node`` node, as printed lines), and the
    run as a whole: ``nodes`` run per inference, ``run_ms`` (the session's own time per run) and
    ``outside_ms`` (that time less the kernels': scheduling, allocation, thread-pool dispatch)."""
    from gn_convert.runtime import session_options

    library, model = None, str(path)
    if native or blocked:
        from gn_convert.native import build_library, nchwc_model

        library = build_library()
        if blocked:
            model = nchwc_model(path, library)[0]
    options = session_options(threads=threads, spinning=False, library=library)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "gn-convert-profile")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [batch] + [d if isinstance(d, int) else 224 for d in inp.shape[1:]]
    feeds = {inp.name: np.random.default_rng(0).random(shape, dtype=np.float32)}
    session.run(None, feeds)  # warm-up; profiled too, so the mean below is over runs + 1
    for _ in range(runs):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    totals: collections.Counter[str] = collections.Counter()
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    run_ms = [e["dur"] / 1000 for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    kernel_ms = sum(e["dur"] for e in kernels) / 1000 / (runs + 1)
    whole = {"nodes": len(kernels) / (runs + 1), "run_ms": sum(run_ms) / max(len(run_ms), 1)}
    whole["outside_ms"] = whole["run_ms"] - kernel_ms
    for event in kernels:
        if per_node is None:
            totals[event["args"]["op_name"]] += event["dur"] / 1000 / (runs + 1)
        elif event["args"]["op_name"] == per_node:
            ms, size = event["dur"] / 1000 / (runs + 1), int(event["args"].get("output_size", 0))
            shapes = [list(v.values())[0] for v in event["args"].get("input_type_shape", [])]
            totals[f"{event['name'][:-len('_kernel_time')]} {shapes[0] if shapes else ''}"
                   f"{' +residual' if len(shapes) > 3 else ''} {size / 1e6:.1f} MB"] += ms
    return dict(totals if per_node else totals.most_common()), whole


def main(argv: list[str] | None = None) -> int:
    """Print the per-op table; 0 on success."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="the .onnx file")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=4, help="profiled runs after one warm-up (default 4)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--native", action="store_true", help="register gn-convert's native GroupNorm kernel")
    p.add_argument("--blocked", action="store_true",
                   help="the kernel on onnxruntime's blocked layout (gn_convert.native.nchwc; implies --native)")
    p.add_argument("--per-node", metavar="OP", help="one line per node of this op type, not totals per type")
    args = p.parse_args(argv)
    if not args.model.is_file():
        print(f"profile_ops: error: {args.model} not found", file=sys.stderr)
        return 2
    totals, whole = profile(args.model, batch=args.batch, runs=args.runs, threads=args.threads, native=args.native,
                            blocked=args.blocked, per_node=args.per_node)
    print(f"{args.model.name}, batch {args.batch}, {args.threads} thread(s), onnxruntime {ort.__version__}, "
          f"kernel ms per run (mean of {args.runs + 1})")
    for op, ms in totals.items():
        print(f"{op:24s} {ms:8.2f}" if args.per_node else f"{op:24s} {ms:8.1f}")
    print(f"{'total':24s} {sum(totals.values()):8.1f}")
    print(f"{whole['nodes']:.0f} nodes run per inference; the session's run {whole['run_ms']:.1f} ms, "
          f"of which outside the kernels {whole['outside_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
