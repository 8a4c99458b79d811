"""``scripts/batch_size_study.py``, the script itself: its bookkeeping and its training
invariants on a tiny configuration (two batch sizes, a fraction of an epoch; the whole tiny
study, about 30 s, runs in the slow tests). What the study
finds (which norm wins at which batch size) is research, recorded by the script's own runs,
and not asserted here."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from helpers.scripts import script_module


@pytest.fixture(scope="module")
def study() -> ModuleType:
    pytest.importorskip("sklearn", reason="the study trains on scikit-learn's digits")
    with script_module("batch_size_study") as module:
        yield module


@pytest.fixture(scope="module")
def tiny(study: ModuleType):
    return study.StudyConfig(batch_sizes=(2, 8), seeds=(0,), pretrain_epochs=0.1, finetune_epochs=0.1,
                             scratch_epochs=0.1)


@pytest.fixture(scope="module")
def runs(study: ModuleType, tiny) -> list:
    return study.run_study(tiny)


@pytest.mark.slow
def test_every_regime_norm_and_batch_size_runs_once(study: ModuleType, tiny, runs: list) -> None:
    keys = sorted((r.regime, r.norm, r.batch_size) for r in runs)
    expected = sorted((g, n, b) for g in study.REGIMES for n in study.NORMS[g] for b in tiny.batch_sizes)
    assert keys == expected and len(runs) == 10
    assert all((r.error_precise_bn is not None) == (r.norm == "BN") for r in runs)
    assert all(0.0 <= r.error <= 100.0 and r.seed == 0 and r.seconds >= 0 for r in runs)


def test_sample_order_depends_only_on_the_seed_and_covers_each_epoch(study: ModuleType) -> None:
    order = study.sample_order(10, 25, seed=3)
    assert len(order) == 25 and sorted(order[:10].tolist()) == list(range(10))
    assert sorted(order[10:20].tolist()) == list(range(10))
    assert torch.equal(order, study.sample_order(10, 25, seed=3))
    assert not torch.equal(order, study.sample_order(10, 25, seed=4))


def test_starting_points_share_the_bn_model_and_convert_it(study: ModuleType, tiny) -> None:
    pretrain_task, target = study.make_tasks(tiny)
    pretrained = study.small_resnet(int(pretrain_task.labels.max()) + 1, tiny.width)
    models = study.starting_points("finetune", pretrained, 5, tiny, seed=0)
    assert set(models) == {"BN", "BN-frozen", "GN"}
    bn, frozen, gn = models["BN"], models["BN-frozen"], models["GN"]
    assert all(torch.equal(a, b) for a, b in zip(bn.state_dict().values(), frozen.state_dict().values()))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gn.modules())
    assert bn[-1].out_features == 5 and set(study.starting_points("scratch", pretrained, 5, tiny, 0)) == {"BN", "GN"}


def test_frozen_batchnorm_training_keeps_the_running_statistics(study: ModuleType, tiny) -> None:
    _, target = study.make_tasks(tiny)
    model = study.small_resnet(5, tiny.width)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    study.train(model, target, batch_size=8, epochs=0.05, lr=0.05, weight_decay=1e-4, seed=0, freeze_bn=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert not model.training
    study.train(model, target, batch_size=8, epochs=0.05, lr=0.05, weight_decay=1e-4, seed=0)
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in stats.items())


@pytest.mark.slow
def test_outputs_are_written_and_agree_with_the_runs(study: ModuleType, tiny, runs: list, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (the `study` extra)")
    summary = study.summarize(runs)
    study.write_json(tmp_path / "s.json", tiny, runs, summary)
    study.plot(summary, tmp_path / "s.png")
    document = json.loads((tmp_path / "s.json").read_text())
    assert len(document["runs"]) == len(runs) == 10
    for run in runs:
        row = next(r for r in document["summary"]
                   if (r["regime"], r["norm"], r["batch_size"]) == (run.regime, run.norm, run.batch_size))
        assert row["error_mean"] == pytest.approx(run.error)  # one seed: the mean is the run
    errors = [r.error for r in runs if (r.regime, r.norm) == ("finetune", "BN")]
    assert document["spread_across_batches"]["finetune/BN"] == pytest.approx(max(errors) - min(errors))
    png = (tmp_path / "s.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.png"]  # no temporary left
    assert "| finetune | GN |" in study.table(summary)
