"""Data order and DDP: each step's items are a pure function of (seed, step), split over
ranks without overlap, and two gloo processes under torchrun follow one process's run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gn_convert import convert, distill
from gn_convert.errors import GnConvertError
from gn_convert.fidelity.distributed import SeededItems, StepBatches, setup
from gn_convert.testing.synthetic import SyntheticImages

RUN = dict(steps=4, batch_size=8, eval_every=2, holdout=8, lr=1e-2, seed=3, warmup_steps=1)
TESTS = Path(__file__).parent


def _steps(sampler: StepBatches) -> list[list[int]]:
    """Items of each optimizer step (micro-batches joined)."""
    flat = [[i for i, _ in micro] for micro in sampler]
    per = sampler.accumulate
    return [sum(flat[k:k + per], []) for k in range(0, len(flat), per)]


def test_ranks_split_each_global_batch_without_overlap() -> None:
    single = _steps(StepBatches(50, 12, 0, 10, seed=1))
    ranks = [_steps(StepBatches(50, 12, 0, 10, seed=1, rank=r, world_size=2, accumulate=3)) for r in range(2)]
    for step in range(10):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(single[step])
        assert not set(ranks[0][step]) & set(ranks[1][step])
    assert len(single) == 10 and all(len(batch) == 12 for batch in single)


def test_epochs_cover_the_data_once_and_a_resumed_sampler_continues_the_same_order() -> None:
    full = list(StepBatches(48, 12, 0, 8, seed=4))
    first_epoch = sorted(i for batch in full[:4] for i, _ in batch)
    assert first_epoch == list(range(48))
    assert [i for i, _ in full[4]] != [i for i, _ in full[0]]  # a new permutation per epoch
    assert list(StepBatches(48, 12, 5, 8, seed=4)) == full[5:]
    assert list(StepBatches(48, 12, 0, 8, seed=5)) != full


def test_item_seeds_make_augmentation_reproducible_and_leave_the_callers_rng_alone() -> None:
    class Noisy(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.rand(3) + index

    items = SeededItems(Noisy())
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    a, b, c = items[(1, 123)], items[(1, 123)], items[(1, 124)]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.rand(1), expected_next)


def test_impossible_batches_are_refused() -> None:
    with pytest.raises(GnConvertError, match="not divisible"):
        StepBatches(50, 10, 0, 4, seed=0, world_size=4)
    with pytest.raises(GnConvertError, match="fewer than one batch"):
        StepBatches(5, 8, 0, 4, seed=0)


def test_a_single_process_is_rank_zero_of_one() -> None:
    procs = setup("cpu")
    assert (procs.rank, procs.world_size, procs.is_main, procs.distributed) == (0, 1, True, False)


SCRIPT = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from helpers.models import make_tiny_teacher
from gn_convert import convert, distill
from gn_convert.testing.synthetic import SyntheticImages
tiny_teacher = make_tiny_teacher()
data = SyntheticImages(count=40, shape=(3, 12, 12), num_classes=5, seed=7)
result = distill(convert(tiny_teacher, 32), tiny_teacher, data, **{run!r})
if torch.distributed.is_initialized():
    raise SystemExit("the process group was left initialised")
import os
if os.environ["RANK"] == "0":
    torch.save(result.model.state_dict(), sys.argv[1])
    json.dump([p.agreement for p in result.history], open(sys.argv[1] + ".json", "w"))
"""


@pytest.mark.slow
@pytest.mark.product_defaults  # the torchrun processes convert with the library's defaults: so does this one
def test_two_gloo_processes_under_torchrun_match_one_process(tmp_path, tiny_teacher) -> None:
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(TESTS), run=RUN)))
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    single = distill(convert(tiny_teacher, 32), tiny_teacher,
                     SyntheticImages(count=40, shape=(3, 12, 12), num_classes=5, seed=7), **RUN)
    ddp_model = convert(tiny_teacher, 32)
    ddp_model.load_state_dict(torch.load(out, weights_only=True))
    images = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b, start = single.model(images), ddp_model.eval()(images), convert(tiny_teacher, 32)(images)
    assert float((a - b).abs().max()) < 1e-4
    assert float((a - start).abs().max()) > 1e-2  # both trained
    assert json.loads(Path(str(out) + ".json").read_text()) == [p.agreement for p in single.history]


RECOVER = """
import json, os, sys
import torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from helpers.models import make_tiny_teacher
from gn_convert.fidelity.recover.engine import recover
from gn_convert.testing.synthetic import SyntheticImages
teacher = make_tiny_teacher()
result = recover(teacher, SyntheticImages(count=64, shape=(3, 12, 12), num_classes=5, seed=7), budget=20,
                 batch_size=8, stages=("reconstruct", "distill"), checkpoint_dir=sys.argv[2])
torch.save(result.model.state_dict(), sys.argv[1] + os.environ["RANK"])
if os.environ["RANK"] == "0":
    json.dump(result.to_dict(), open(sys.argv[1] + ".json", "w"))
"""


@pytest.mark.slow
def test_recover_runs_under_torchrun_with_one_state_on_every_process(tmp_path) -> None:
    script = tmp_path / "recover.py"
    script.write_text(textwrap.dedent(RECOVER.format(tests=str(TESTS))))
    out, state = tmp_path / "model.pt", tmp_path / "state"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out), str(state)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    first, second = (torch.load(f"{out}{rank}", weights_only=True) for rank in (0, 1))
    assert all(torch.equal(first[k], second[k]) for k in first)  # the processes stayed in step
    report = json.loads(Path(f"{out}.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["convert", "reconstruct", "distill"]
    assert report["stages"][2]["detail"]["steps"] >= 1 and (state / "recover.pt").is_file()
    assert (state / "distill" / "state.pt").is_file()
