"""The batch-size study's fast mode (``scripts/batch_size_study.py --fast``): one seed, short
schedules, real digits. Each test asserts what held on every one of seeds 0-4 when measured
(the numbers are in the test). The paper's headline, BN degrading at 2 images a batch, did
not reproduce at this scale; BN fine-tuned in train mode at batch 1 did fail, and is tested."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "batch_size_study.py"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("batch_size_study", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def study() -> ModuleType:
    pytest.importorskip("sklearn", reason="the study trains on scikit-learn's digits")
    return _load_script()


@pytest.fixture(scope="module")
def fast_runs(study: ModuleType) -> list:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return study.run_study(study.StudyConfig.fast(seed=0))
    finally:
        torch.set_num_threads(threads)


def _error(runs: list, regime: str, norm: str, batch_size: int) -> float:
    (run,) = [r for r in runs if (r.regime, r.norm, r.batch_size) == (regime, norm, batch_size)]
    return run.error


def test_fast_study_runs_every_regime_norm_and_batch_once(study: ModuleType, fast_runs: list) -> None:
    keys = sorted((r.regime, r.norm, r.batch_size) for r in fast_runs)
    expected = sorted((g, n, b) for g in study.REGIMES for n in study.NORMS[g] for b in (1, 2, 4, 8, 16, 32))
    assert len(keys) == 30 and keys == expected
    assert all((r.error_precise_bn is not None) == (r.norm == "BN") for r in fast_runs)


def test_finetuned_models_learn_the_new_digits(fast_runs: list) -> None:
    # Chance is 80% error (5 classes). Seeds 0-4 measured: at most 14.8% (BN-frozen at batch 32,
    # 14 steps) for every run except BN in train mode at batch 1 (see below); at batch 2, at
    # most 6.9%.
    finetuned = [r for r in fast_runs if r.regime == "finetune" and (r.norm, r.batch_size) != ("BN", 1)]
    assert len(finetuned) == 17
    assert max(r.error for r in finetuned) < 20.0
    assert max(r.error for r in finetuned if r.batch_size == 2) < 8.0


def test_bn_finetuned_in_train_mode_at_batch_1_fails_where_its_conversion_does_not(fast_runs: list) -> None:
    # Seeds 0-4, BN (running statistics) / GN at batch 1: 35.6/2.7, 19.9/4.8, 17.4/2.3, 34.7/2.7,
    # 32.0/3.0 (%). Recomputing BN's statistics does not rescue it (30.8, 18.3, 20.1, 26.0, 29.5).
    gn, bn = _error(fast_runs, "finetune", "GN", 1), _error(fast_runs, "finetune", "BN", 1)
    assert gn < 8.0
    assert gn < bn - 8.0
    (bn_run,) = [r for r in fast_runs if (r.regime, r.norm, r.batch_size) == ("finetune", "BN", 1)]
    assert gn < bn_run.error_precise_bn - 8.0


def test_finetuned_gn_error_spread_across_batch_sizes_is_smaller_than_bn(study: ModuleType, fast_runs: list) -> None:
    # Max minus min error over batch sizes 1-32, seeds 0-4, BN / GN: 31.3/4.8, 15.1/6.2,
    # 13.7/8.9, 32.0/3.2, 28.8/5.9 points; batch 1 makes BN's. Over 2-32 alone it did not hold,
    # nor from scratch (GN at batch 32 diverged once in 28 steps: 31.7% error).
    summary = study.summarize(fast_runs)
    bn = study.spread_across_batches(summary, "finetune", "BN")
    gn = study.spread_across_batches(summary, "finetune", "GN")
    assert gn < bn - 3.0


def test_converted_model_at_batch_1_is_no_worse_than_frozen_bn(fast_runs: list) -> None:
    # GN minus BN-frozen at batch 1, seeds 0-4: -0.7, +0.5, -0.7, +0.2, -3.0 points.
    gn, frozen = _error(fast_runs, "finetune", "GN", 1), _error(fast_runs, "finetune", "BN-frozen", 1)
    assert gn <= frozen + 1.5


def test_converted_model_finetuned_at_batch_2_matches_bn_at_batch_2(fast_runs: list) -> None:
    # GN minus BN at batch 2, seeds 0-4: -2.5, -2.3, -2.1, +0.2, -0.7 points.
    gn, bn = _error(fast_runs, "finetune", "GN", 2), _error(fast_runs, "finetune", "BN", 2)
    assert gn <= bn + 1.5


def test_converted_model_finetuned_at_batch_2_beats_bn_at_batch_32(fast_runs: list) -> None:
    # Same samples seen. Seeds 0-4: GN at batch 2 2.1-4.6%, BN at batch 32 7.5-10.5%; the gap
    # was at least 3.3 points. (Part of it is the short schedule: batch 32 gets 14 steps.)
    gn_small = _error(fast_runs, "finetune", "GN", 2)
    bn_large = _error(fast_runs, "finetune", "BN", 32)
    assert gn_small < bn_large - 1.0


def test_bn_from_scratch_at_batch_2_is_not_worse_than_at_batch_32(fast_runs: list) -> None:
    # The paper's BN degradation at 2 images a batch did not appear on digits: BN from scratch
    # at batch 2 vs 32, seeds 0-4: 3.0/2.5, 1.4/2.5, 1.8/2.7, 1.4/2.5, 3.0/2.7 (%).
    assert _error(fast_runs, "scratch", "BN", 2) <= _error(fast_runs, "scratch", "BN", 32) + 1.5


def test_outputs_are_written_and_agree_with_the_runs(study: ModuleType, fast_runs: list, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the `study` extra)")
    summary = study.summarize(fast_runs)
    study.write_json(tmp_path / "s.json", study.StudyConfig.fast(seed=0), fast_runs, summary)
    study.plot(summary, tmp_path / "s.png")
    document = json.loads((tmp_path / "s.json").read_text())
    assert len(document["runs"]) == len(fast_runs) == 30
    row = next(r for r in document["summary"] if (r["regime"], r["norm"], r["batch_size"]) == ("finetune", "GN", 2))
    assert row["error_mean"] == pytest.approx(_error(fast_runs, "finetune", "GN", 2))
    assert document["spread_across_batches"]["finetune/BN"] == pytest.approx(
        study.spread_across_batches(summary, "finetune", "BN"))
    png = (tmp_path / "s.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.png"]  # no temporary left
    assert "| finetune | GN |" in study.table(summary)
