"""The latency harness (``gn_convert.bench.harness``) and ``gn-convert bench``.

No timing is asserted: the harness's order, statistics and ratios are checked with fake
calls, and the CLI runs two tiny rounds on the 64x64 test exports.
"""

from __future__ import annotations

import json
import time

import numpy as np
import onnxruntime as ort
import pytest
import torch

from gn_convert.bench.harness import Variant, parse_batches, run_bench, summarize, time_interleaved
from gn_convert.bench.variants import ort_session, session_input_shape, torch_variant
from gn_convert.cli import main
from gn_convert.errors import BenchError
from helpers.models import SIZE


def test_interleaving_puts_every_variant_at_every_position() -> None:
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    seconds = time_interleaved(calls, rounds=3, warmup=1)
    assert order[:3] == ["a", "b", "c"]  # the warm-up round
    rounds = [order[3 + 3 * r: 6 + 3 * r] for r in range(3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert {name: len(s) for name, s in seconds.items()} == {"a": 3, "b": 3, "c": 3}


def test_summary_is_median_quartiles_and_ratio_to_baseline_median() -> None:
    m = summarize("gn", 8, [0.004, 0.001, 0.002, 0.003, 0.100], baseline_median=0.002)
    assert (m.median_ms, m.samples, m.batch) == (3.0, 5, 8)
    assert m.q1_ms <= m.median_ms <= m.q3_ms
    assert m.ratio == pytest.approx(1.5)
    assert summarize("x", 1, [0.001], None).ratio is None


class _FakeClock:
    """A wall clock that advances only when a fake variant "runs": timings exact on any machine."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fake(name: str, shapes: list[tuple[int, ...]], seconds_per_sample: float = 0.0,
          clock: _FakeClock | None = None) -> Variant:
    def prepare(batch: np.ndarray):
        shapes.append(batch.shape)

        def call() -> None:
            if clock is not None:
                clock.now += seconds_per_sample * len(batch)
        return call
    return Variant(name, prepare, note=f"fake {name}")


def test_run_bench_measures_each_variant_per_batch_with_ratios_to_the_baseline(monkeypatch) -> None:
    """The baseline takes 10 ms a sample, the other variant 30 ms, on a fake clock (a sleeping fake
    measured the machine's load, not the harness): medians and ratios are exact."""
    from gn_convert.bench import harness

    clock = _FakeClock()
    monkeypatch.setitem(harness.CLOCKS, "wall", clock)
    shapes: list[tuple[int, ...]] = []
    result = run_bench([_fake("bn", shapes, 0.010, clock), _fake("gn", shapes, 0.030, clock)], (3, 8, 8),
                       batches=[1, 4], rounds=3, warmup=0, baseline="bn", threads=2)
    assert shapes == [(1, 3, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8)]
    assert len(result.measurements) == 4
    for batch in (1, 4):
        bn, gn = result.get("bn", batch), result.get("gn", batch)
        assert bn.ratio == 1.0 and bn.median_ms == pytest.approx(10.0 * batch)
        assert gn.median_ms == pytest.approx(30.0 * batch) and gn.samples == 3
        assert gn.ratio == pytest.approx(3.0, rel=1e-3), (batch, gn.ratio)
    table = result.table()
    assert "2 intra-op threads" in table and f"onnxruntime {ort.__version__}" in table
    assert "b1 ms" in table and "b4 ms" in table and "fake gn" in table
    json.dumps(result.to_dict())


def test_cpu_clock_measures_process_time_not_sleep() -> None:
    """A call that sleeps costs wall time but no CPU time: the ``cpu`` clock ignores waiting."""
    calls = {"sleep": lambda: time.sleep(0.05)}
    assert min(time_interleaved(calls, rounds=2, warmup=0, clock="wall")["sleep"]) >= 0.05
    assert max(time_interleaved(calls, rounds=2, warmup=0, clock="cpu")["sleep"]) < 0.025


@pytest.mark.parametrize("kwargs,match", [
    ({"baseline": "missing"}, "baseline"), ({"rounds": 0}, "round"), ({"clock": "sundial"}, "clock"),
], ids=["unknown-baseline", "no-rounds", "unknown-clock"])
def test_run_bench_refuses_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(BenchError, match=match):
        run_bench([_fake("a", [])], (3, 4, 4), **kwargs)


@pytest.mark.parametrize("text,expected", [("1,8", [1, 8]), ("4", [4]), ("2,2,1", [2, 1])])
def test_parse_batches(text: str, expected: list[int]) -> None:
    assert parse_batches(text) == expected


@pytest.mark.parametrize("text", ["", "0", "1,x", "-2"])
def test_parse_batches_refuses_non_positive_or_non_integer(text: str) -> None:
    with pytest.raises(BenchError, match="positive integers"):
        parse_batches(text)


def test_session_input_shape_uses_exporter_shape_for_symbolic_dims(exports) -> None:
    session = ort_session(exports.exported("resnet18").path, threads=1)
    assert session_input_shape(session) == (3, SIZE, SIZE)


def test_cli_bench_prints_ratios_against_baseline(tmp_path, capsys, exports) -> None:
    model, baseline = exports.exported("resnet18").path, exports.exported("resnet18", "inlined").path
    out = tmp_path / "bench.json"
    code = main(["bench", str(model), "--baseline", str(baseline), "--fast", "--batch", "1,2", "--rounds", "2",
                 "--warmup", "1", "--threads", "1", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "1 intra-op threads" in text and "ratio" in text
    lines = text.splitlines()
    head = next(k for k, line in enumerate(lines) if line.startswith("variant"))
    rows = [line.split()[0] for line in lines[head + 2:head + 5]]
    assert rows == ["baseline", "model", "fast"]
    data = json.loads(out.read_text())
    assert {(m["variant"], m["batch"]) for m in data["measurements"]} == {
        (v, b) for v in ("baseline", "model", "fast") for b in (1, 2)}
    assert all(m["ratio"] == 1.0 for m in data["measurements"] if m["variant"] == "baseline")
    medians = {(m["variant"], m["batch"]): m["median_ms"] for m in data["measurements"]}
    for m in data["measurements"]:  # every ratio is its median over the baseline's, at its own batch
        assert m["ratio"] == pytest.approx(m["median_ms"] / medians[("baseline", m["batch"])], rel=1e-3)
    # the note says what the fast variant is, in the user's words (defect: "lowered by to_fast")
    assert data["notes"]["fast"] == f"{model} lowered to the fast target (InstanceNormalization per group, as " \
        "`gn-convert export --target fast` writes it)" and "to_fast" not in text


def test_cli_bench_help_lists_each_spinning_mode_once(capsys) -> None:
    """Defect: the help showed `--spinning {off,on,off,on}`."""
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{off,on,off,on}" not in text and "--spinning MODE" in text and "off, on, or off,on (both)" in text


def test_cli_bench_missing_file_is_one_line_exit_2(tmp_path, capsys) -> None:
    assert main(["bench", str(tmp_path / "none.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cli_bench_cuda_without_gpu_build_says_so_exit_2(capsys, exports) -> None:
    assert main(["bench", str(exports.exported("resnet18").path), "--provider", "cuda"]) == 2
    assert "CUDAExecutionProvider is not available" in capsys.readouterr().err


def test_torch_variant_restores_the_callers_thread_count() -> None:
    """Defect: timing a torch variant left torch.set_num_threads(threads) set for the whole process."""
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    seen: list[int] = []
    model.register_forward_hook(lambda *args: seen.append(torch.get_num_threads()))
    call = torch_variant("torch", model, threads=wanted).prepare(np.zeros((1, 3, 8, 8), np.float32))
    call()
    assert seen == [wanted]  # the variant runs at its own count...
    assert torch.get_num_threads() == before  # ...and gives the process its own back


def test_cli_bench_runs_each_thread_count_and_spinning_setting_with_the_physical_limit(tmp_path, capsys,
                                                                                      exports) -> None:
    model, baseline = exports.exported("resnet18").path, exports.exported("resnet18", "inlined").path
    out = tmp_path / "bench.json"
    assert main(["bench", str(model), "--baseline", str(baseline), "--batch", "2", "--rounds", "1", "--warmup", "0",
                 "--threads", "1,2", "--spinning", "off,on", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert [line for line in text.splitlines() if "thread(s), spinning" in line] == [
        "1 thread(s), spinning off", "1 thread(s), spinning on", "2 thread(s), spinning off", "2 thread(s), spinning on"]
    data = json.loads(out.read_text())
    assert [(d["threads"], d["spinning"]) for d in data] == [(1, False), (1, True), (2, False), (2, True)]
    limits = [line for line in text.splitlines() if "GroupNorm calls move" in line]
    assert len(limits) == 4
    from gn_convert.bench.limits import groupnorm_traffic

    torch_count = groupnorm_traffic(exports.converted("resnet18"), (2, 3, SIZE, SIZE))  # the torch-side count
    assert torch_count.activation_bytes == 4 * 2 * 202_752  # 64x32x32 + 4x64x16x16 + 5x128x8x8 + 5x256x4x4 + 5x512x2x2
    assert all(f"20 GroupNorm calls move >= {torch_count.minimum_bytes / 1e6:.0f} MB" in line for line in limits)
