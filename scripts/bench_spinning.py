"""GroupNorm vs BatchNorm latency with onnxruntime's thread pools spinning (its default).

``scripts/bench_latency.py`` interleaves every variant call by call, which needs spinning off
(a spinning pool steals the cores from the next session timed; scripts/PERF.md, finding 1).
Deployments run with onnxruntime's default, spinning on, where a pool wakes faster for short
ops. This script times two models that way: one session alive at a time, in alternating
blocks (A B B A A B ...), and reports medians and the ratio. Blocks are less robust to a
busy machine than interleaved calls: repeat the command and quote the spread.

Usage::

    python scripts/bench_spinning.py BN.onnx GN.onnx --native --threads 2 --batch 1,8
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from gn_convert.bench.harness import parse_batches
from gn_convert.bench.variants import ort_session, session_input_shape


def block_times(path: Path, feeds: dict[str, np.ndarray], *, threads: int, library: Path | None, runs: int,
                warmup: int = 5) -> list[float]:
    """Seconds of ``runs`` calls of a fresh session (spinning on), after ``warmup`` calls."""
    session = ort_session(path, threads=threads, custom_ops_library=library, spinning=True)
    for _ in range(warmup):
        session.run(None, feeds)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        seconds.append(time.perf_counter() - start)
    del session
    gc.collect()
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Print one line per batch size; 0 on success."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("baseline", type=Path, help="the BatchNorm original (.onnx)")
    p.add_argument("model", type=Path, help="the GroupNorm model (.onnx, function form)")
    p.add_argument("--native", action="store_true", help="run the model with gn-convert's native kernel")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--blocks", type=int, default=6, help="alternating blocks per model (default 6)")
    p.add_argument("--runs", type=int, default=12, help="timed calls per block (default 12)")
    args = p.parse_args(argv)
    library = None
    if args.native:
        from gn_convert.native import build_library

        library = build_library()
    shape = session_input_shape(ort_session(args.model, threads=1))
    print(f"{args.model.name} vs {args.baseline.name}, {args.threads} threads, spinning on, {args.blocks} "
          f"alternating blocks of {args.runs} calls, one session alive at a time"
          f"{', native kernel' if library else ''}")
    for batch in parse_batches(args.batch):
        feeds = {"input": np.random.default_rng(0).random((batch, *shape), dtype=np.float32)}
        times: dict[str, list[float]] = {"baseline": [], "model": []}
        for block in range(args.blocks):
            order = ("baseline", "model") if block % 2 == 0 else ("model", "baseline")
            for name in order:
                path, lib = (args.baseline, None) if name == "baseline" else (args.model, library)
                times[name] += block_times(path, feeds, threads=args.threads, library=lib, runs=args.runs)
        base, model = statistics.median(times["baseline"]), statistics.median(times["model"])
        print(f"batch {batch}: baseline {base * 1e3:.1f} ms, model {model * 1e3:.1f} ms, ratio {model / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
