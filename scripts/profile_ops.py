"""Where an ONNX model's time goes under onnxruntime's CPU provider: kernel time per op type.

Runs the model a few times with onnxruntime's profiler on, sums each node's kernel time by op
type, and prints the mean per run, largest first (the "where the time goes" tables of
scripts/PERF.md). ``--native`` registers gn-convert's native GroupNorm kernel.

Usage::

    python scripts/profile_ops.py resnet50.function.onnx --native --batch 8
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


def profile(path: Path, *, batch: int, runs: int, threads: int, native: bool) -> dict[str, float]:
    """Mean kernel milliseconds per run, by op type."""
    from gn_convert.runtime import session_options

    library = None
    if native:
        from gn_convert.native import build_library

        library = build_library()
    options = session_options(threads=threads, spinning=False, library=library)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.gettempdir()) / "gn-convert-profile")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / 1000 / (runs + 1)
    return dict(totals.most_common())


def main(argv: list[str] | None = None) -> int:
    """Print the per-op table; 0 on success."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="the .onnx file")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=4, help="profiled runs after one warm-up (default 4)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--native", action="store_true", help="register gn-convert's native GroupNorm kernel")
    args = p.parse_args(argv)
    if not args.model.is_file():
        print(f"profile_ops: error: {args.model} not found", file=sys.stderr)
        return 2
    totals = profile(args.model, batch=args.batch, runs=args.runs, threads=args.threads, native=args.native)
    print(f"{args.model.name}, batch {args.batch}, {args.threads} thread(s), onnxruntime {ort.__version__}, "
          f"kernel ms per run (mean of {args.runs + 1})")
    for op, ms in totals.items():
        print(f"{op:24s} {ms:8.1f}")
    print(f"{'total':24s} {sum(totals.values()):8.1f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
