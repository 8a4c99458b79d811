"""Latency benchmarks: ONNX models (and torch modules) timed interleaved in one process.

Timings on a shared machine drift by 2x between runs, so a latency is only meaningful as a
ratio against a baseline measured in the same process, at the same time. This module runs
every variant once per round, in a rotated order, for a number of rounds, and reports each
variant's median latency and its ratio to the baseline's median (the BatchNorm original,
whose norms onnxruntime folds into the convolutions).

- :mod:`gn_convert.bench.variants`: the things that are timed (onnxruntime sessions, torch
  modules).
- :func:`run_bench`: the interleaved timing over batch sizes; returns a :class:`BenchResult`
  whose :meth:`~BenchResult.table` is the table the CLI and the script print.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from gn_convert.errors import BenchError
from gn_convert.runtime import PROVIDERS

log = logging.getLogger(__name__)


Call = Callable[[], object]
"""One inference on inputs bound beforehand (nothing else is timed)."""
Prepare = Callable[[np.ndarray], Call]
"""Bind an input batch (copy it to the device, cast it) and return the timed call."""


@dataclass(frozen=True)
class Variant:
    """One thing to time.

    Attributes:
        name: the row label (``bn``, ``function``, ``torch-eager``, ...).
        prepare: binds an input batch and returns the call that is timed.
        note: a short description printed under the table.
    """

    name: str
    prepare: Prepare
    note: str = ""


@dataclass(frozen=True)
class Measurement:
    """The timings of one variant at one batch size.

    Attributes:
        variant: the variant's name.
        batch: images per call.
        median_ms: median latency of one call, milliseconds.
        q1_ms: first quartile, milliseconds.
        q3_ms: third quartile, milliseconds.
        min_ms: fastest call, milliseconds (the least disturbed by other processes).
        ratio: ``median_ms`` over the baseline's median at the same batch (None without one).
        samples: how many timed calls the median is over.
    """

    variant: str
    batch: int
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    ratio: float | None
    samples: int


@dataclass
class BenchResult:
    """Everything one benchmark run measured, and the conditions it ran under.

    Attributes:
        measurements: one per variant and batch size.
        baseline: the variant the ratios are against (None: no ratios).
        threads: intra-op threads of every session (and of torch).
        provider: ``cpu`` or ``cuda``.
        runtime: the onnxruntime version.
        input_shape: one sample's shape (C, H, W).
        rounds: timed rounds (each runs every variant once).
        notes: variant name -> description.
        clock: ``wall`` (latency) or ``cpu`` (process CPU time).
        engine: the runtime timed (``onnxruntime``, ``OpenVINO``); ``runtime`` is its version.
    """

    measurements: list[Measurement]
    baseline: str | None
    threads: int
    provider: str
    runtime: str
    input_shape: tuple[int, ...]
    rounds: int
    notes: dict[str, str] = field(default_factory=dict)
    clock: str = "wall"
    engine: str = "onnxruntime"

    def get(self, variant: str, batch: int) -> Measurement:
        """The measurement of one variant at one batch size (KeyError if absent)."""
        for m in self.measurements:
            if m.variant == variant and m.batch == batch:
                return m
        raise KeyError((variant, batch))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    def table(self) -> str:
        """The result as a fixed-width text table: one row per variant, ms and ratio per batch."""
        batches = sorted({m.batch for m in self.measurements})
        variants = list(dict.fromkeys(m.variant for m in self.measurements))
        width = max(len("variant"), *(len(v) for v in variants))
        head = f"{'variant':<{width}}" + "".join(f"  {'b' + str(b) + ' ms':>10} {'ratio':>6}" for b in batches)
        lines = [self.header(), head, "-" * len(head)]
        for variant in variants:
            cells = []
            for batch in batches:
                try:
                    m = self.get(variant, batch)
                except KeyError:
                    cells.append(f"  {'-':>10} {'-':>6}")
                    continue
                ratio = f"{m.ratio:.2f}x" if m.ratio is not None else "-"
                cells.append(f"  {m.median_ms:>10.1f} {ratio:>6}")
            lines.append(f"{variant:<{width}}" + "".join(cells))
        lines += [f"  {name}: {note}" for name, note in self.notes.items() if note]
        return "\n".join(lines)

    def header(self) -> str:
        """One line on the conditions: runtime, provider, threads, input, rounds, baseline."""
        shape = "x".join(map(str, self.input_shape))
        base = f"ratio = median / median of {self.baseline}" if self.baseline else "no baseline"
        what = "wall-clock latency" if self.clock == "wall" else "process CPU time"
        return (f"{self.engine} {self.runtime}, {PROVIDERS.get(self.provider, self.provider)}, "
                f"{self.threads} intra-op threads, input Nx{shape}, {what}, median of {self.rounds} "
                f"interleaved rounds; {base}")


def parse_batches(text: str) -> list[int]:
    """Parse a batch list such as ``1,8``.

    Raises:
        BenchError: when an entry is not a positive integer.
    """
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise BenchError(f"batch list {text!r} is not a comma-separated list of positive integers, such as 1,8")
    return list(dict.fromkeys(batches))


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""``wall``: latency. ``cpu``: this process's CPU time (all its threads), which other processes
on a busy machine do not inflate; a measure of work, equal to latency at one thread."""


def time_interleaved(calls: Mapping[str, Call], rounds: int, warmup: int = 1,
                     clock: str = "wall") -> dict[str, list[float]]:
    """Time each call once per round, rotating the order every round.

    Rotation puts every variant at every position equally often, so a slow phase of the
    machine (another process, a frequency change) is shared out instead of hitting one variant.

    Args:
        calls: name -> the timed call.
        rounds: timed rounds.
        warmup: untimed rounds first (memory arenas, caches, CUDA kernels).
        clock: ``wall`` or ``cpu`` (see :data:`CLOCKS`).

    Returns:
        name -> seconds of each timed call, in round order.
    """
    now = CLOCKS[clock]
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = now()
            calls[name]()
            seconds[name].append(now() - start)
    return seconds


def summarize(name: str, batch: int, seconds: Sequence[float], baseline_median: float | None) -> Measurement:
    """Median, quartiles and ratio (to ``baseline_median`` seconds) of one variant's timings."""
    ms = sorted(s * 1e3 for s in seconds)
    median = statistics.median(ms)
    q1, q3 = (statistics.quantiles(ms, n=4)[0::2] if len(ms) > 1 else (median, median))
    ratio = median / (baseline_median * 1e3) if baseline_median else None
    return Measurement(name, batch, round(median, 3), round(q1, 3), round(q3, 3), round(ms[0], 3),
                       round(ratio, 4) if ratio is not None else None, len(ms))


def run_bench(variants: Sequence[Variant], input_shape: Sequence[int], *, batches: Sequence[int] = (1, 8),
              rounds: int = 10, warmup: int = 2, baseline: str | None = None, threads: int = 1,
              provider: str = "cpu", seed: int = 0, clock: str = "wall",
              engine: tuple[str, str] | None = None) -> BenchResult:
    """Time every variant interleaved, per batch size, and compute ratios to the baseline.

    Args:
        variants: what to time (names unique).
        input_shape: one sample's shape (C, H, W); inputs are seeded uniform [0, 1) floats.
        batches: batch sizes, each timed separately.
        rounds: timed rounds per batch size.
        warmup: untimed rounds per batch size.
        baseline: the variant ratios are against (None: no ratios).
        threads: the thread count the sessions were made with (recorded, not applied).
        provider: ``cpu`` or ``cuda`` (recorded).
        seed: input seed.
        clock: ``wall`` (latency, default) or ``cpu`` (process CPU time; see :data:`CLOCKS`).
        engine: ``(name, version)`` of the runtime timed (recorded; default onnxruntime's).

    Returns:
        The :class:`BenchResult`.

    Raises:
        BenchError: duplicate names, an unknown baseline or clock, or fewer than one round.
    """
    import onnxruntime as ort

    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise BenchError(f"variant names must be unique: {names}")
    if baseline is not None and baseline not in names:
        raise BenchError(f"baseline {baseline!r} is not one of the variants {names}")
    if rounds < 1:
        raise BenchError(f"need at least one round, got {rounds}")
    if clock not in CLOCKS:
        raise BenchError(f"unknown clock {clock!r}; choose one of {', '.join(CLOCKS)}")
    gen = np.random.default_rng(seed)
    measurements: list[Measurement] = []
    for batch in batches:
        data = gen.random((batch, *input_shape), dtype=np.float32)
        calls = {v.name: v.prepare(data) for v in variants}
        seconds = time_interleaved(calls, rounds, warmup, clock)
        base = statistics.median(seconds[baseline]) if baseline else None
        for name in names:
            measurements.append(summarize(name, batch, seconds[name], base))
        log.info("batch %d: %s", batch, ", ".join(f"{m.variant} {m.median_ms:.1f} ms"
                                                 for m in measurements if m.batch == batch))
    name, version = engine or ("onnxruntime", ort.__version__)
    return BenchResult(measurements, baseline, threads, provider, version, tuple(input_shape), rounds,
                       {v.name: v.note for v in variants}, clock, name)
