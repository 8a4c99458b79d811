"""``gn-convert bench``: latency of an exported model against its BatchNorm original.

Every model is timed interleaved with the others in one process (a ratio measured that way
survives the 2x drift of a shared machine; absolute milliseconds do not).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gn_convert import strict_json
from gn_convert.cli.arguments import add_native_library_argument
from gn_convert.errors import BenchError

if TYPE_CHECKING:  # the parser is built without onnx or onnxruntime; run() imports them
    import onnx

    from gn_convert.bench.harness import BenchResult


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``bench`` command."""
    p = sub.add_parser(
        "bench", help="time an ONNX model under onnxruntime against its BatchNorm original",
        description="Median latency of MODEL (and of --baseline, --fast, --native) under onnxruntime, timed "
        "interleaved in one process, with ratios to the baseline. Compare ratios, not milliseconds.")
    p.add_argument("model", type=Path, metavar="MODEL.onnx", help="the model to time (gn-convert export's output)")
    p.add_argument("--baseline", type=Path, metavar="BN.onnx",
                   help="the BatchNorm original exported to ONNX; ratios are against it")
    p.add_argument("--fast", action="store_true",
                   help="also time MODEL lowered by the fast InstanceNormalization pass (function-form MODEL)")
    p.add_argument("--native", action="store_true",
                   help="also time MODEL with gn-convert's native GroupNorm kernel registered (`gn-convert native`)")
    p.add_argument("--batch", default="1,8", metavar="B[,B...]", help="batch sizes (default 1,8)")
    p.add_argument("--threads", default=str(min(os.cpu_count() or 1, 4)), metavar="N[,N...]",
                   help="onnxruntime intra-op threads; several (1,2) time each (default: CPU count, at most 4)")
    p.add_argument("--spinning", choices=("off", "on", "off,on"), default="off", metavar="MODE",
                   help="off, on, or off,on (both): idle pool threads spin (onnxruntime's default) or not "
                   "(default off: fair interleaving)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per batch size (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds per batch size (default 2)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="execution provider (default cpu)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: latency (default); cpu: process CPU time, robust on a busy machine")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the measurements as JSON")
    add_native_library_argument(p)


def _input_fallback(path: Path) -> tuple[int, ...] | None:
    """The sample shape recorded by the exporter (``gn_convert.input_shape``), if any."""
    from gn_convert.onnx.reading import read_model

    props = {p.key: p.value for p in read_model(path, load_external_data=False).metadata_props}
    dims = [int(d) for d in props.get("gn_convert.input_shape", "").split(",") if d.strip()]
    return tuple(dims[1:]) if len(dims) >= 3 else None


def run(args: argparse.Namespace) -> int:
    """Time the models and print one table per thread count and spinning setting; 0 on success."""
    from gn_convert.atomic import atomic_file
    from gn_convert.bench.harness import parse_batches
    from gn_convert.onnx.reading import read_model

    batches = parse_batches(args.batch)
    if args.native and args.provider != "cpu":
        raise BenchError("--native is a CPU kernel; use it with --provider cpu")
    fallback = _input_fallback(args.model)
    results = []
    with tempfile.TemporaryDirectory(prefix="gn-convert-bench-") as tmp:
        paths = {"baseline": args.baseline} if args.baseline else {}
        paths["model"] = args.model
        if args.fast:
            from gn_convert.onnx.export import lower_onnx

            paths["fast"] = lower_onnx(args.model, Path(tmp) / "fast.onnx", "fast").path
        library = None
        if args.native:
            from gn_convert.native import resolve_library

            library = resolve_library(args.native_library)
        onnx_model = read_model(args.model, load_external_data=False) if args.baseline and args.provider == "cpu" else None
        for threads in parse_batches(args.threads):
            for spinning in args.spinning.split(","):
                result = _bench_once(args, paths, library, threads, spinning == "on", batches, fallback)
                print(result.table())
                if onnx_model is not None:
                    print("\n".join(_limits(onnx_model, result, threads)))
                results.append({"spinning": spinning == "on", **result.to_dict()})
    if args.json:
        with atomic_file(args.json) as out:
            out.write_text(strict_json.dumps(results if len(results) > 1 else results[0], indent=2))
    return 0


def _bench_once(args: argparse.Namespace, paths: dict[str, Path], library: Path | None, threads: int,
                spinning: bool, batches: list[int], fallback: tuple[int, ...] | None) -> BenchResult:
    """One interleaved timing of every session at one thread count and spinning setting."""
    from gn_convert.bench.harness import run_bench
    from gn_convert.bench.variants import ort_session, session_input_shape, session_variant

    sessions = {name: ort_session(path, threads=threads, provider=args.provider, spinning=spinning)
                for name, path in paths.items()}
    notes = {**{name: str(path) for name, path in paths.items()}, "fast": f"{args.model} lowered to the fast target "
             "(InstanceNormalization per group, as `gn-convert export --target fast` writes it)"}
    if library is not None:
        sessions["native"] = ort_session(args.model, threads=threads, provider=args.provider,
                                         custom_ops_library=library, spinning=spinning)
        notes["native"] = f"{args.model} with {library} (GroupNorm on the blocked layout where this CPU has it)"
    variants = [session_variant(name, s, note=notes[name]) for name, s in sessions.items()]
    shape = session_input_shape(sessions["model"], fallback)
    print(f"\n{threads} thread(s), spinning {'on' if spinning else 'off'}")
    return run_bench(variants, shape, batches=batches, rounds=args.rounds, warmup=args.warmup,
                     baseline="baseline" if args.baseline else None, threads=threads, provider=args.provider,
                     clock=args.clock)


def _limits(model: onnx.ModelProto, result: BenchResult, threads: int) -> list[str]:
    """The physical-limit lines of a function-form model (none when its shapes cannot be inferred)."""
    from gn_convert.bench.limits import limit_lines, onnx_groupnorm_traffic

    try:
        traffic = {m.batch: onnx_groupnorm_traffic(model, (m.batch, *result.input_shape)) for m in result.measurements}
    except ValueError as err:
        return [f"physical limit: not computed ({err})"]
    return limit_lines(result, traffic.__getitem__, threads, "baseline")
