"""The ``finetune`` command and the pipeline's --data/--calibrate/--finetune-steps options,
on a folder of real digit images, with resume and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gn_convert
from gn_convert import load_converted
from gn_convert.cli import main
from gn_convert.fidelity.distill.state import state_path

FAST = ["--input-size", "16", "--batch-size", "8", "--eval-every", "2", "--holdout", "0.2"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, nontrivial) -> tuple[Path, Path, Path]:
    """(teacher weights file, digits ImageFolder, converted checkpoint), built once per module."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("finetune-cli")
    weights = root / "teacher.pt"
    torch.save(nontrivial("resnet18", size=16).state_dict(), weights)
    bunch = load_digits()
    for k in range(60):
        pixels = (bunch.images[k] * 16).clip(0, 255).astype(np.uint8)
        path = root / "digits" / str(bunch.target[k]) / f"{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((16, 16)).convert("RGB").save(path)
    checkpoint = root / "ck"
    assert main(["resnet18", "--weights", str(weights), "--out", str(checkpoint), "--no-onnx"]) == 0
    return weights, root / "digits", checkpoint


def test_pipeline_calibrates_and_distils_when_given_data(tmp_path, capsys, workspace) -> None:
    weights, data, _ = workspace
    out = tmp_path / "gn"
    code = main(["resnet18", "--weights", str(weights), "--out", str(out), "--no-onnx", "--data", str(data),
                 "--calibrate", "2", "--finetune-steps", "2", *FAST])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["calibration"]["layers"]) == 20 and report["calibration"]["samples"] == 16
    assert [p["step"] for p in report["finetune"]["history"]] == [0, 2]
    assert report["finetune"]["heldout"] == 12
    assert "held-out agreement" in capsys.readouterr().out


def test_finetune_writes_a_new_checkpoint_and_resumes_from_its_state(tmp_path, capsys, workspace) -> None:
    _, data, checkpoint = workspace
    first, second = tmp_path / "a", tmp_path / "b"
    args = ["finetune", str(checkpoint), "--data", str(data), "--steps", "4", "--checkpoint-every", "2", *FAST]
    assert main([*args, "--out", str(first), "--keep-state"]) == 0
    state = first.with_name("a.train-state")
    assert torch.load(state_path(state), weights_only=True)["step"] == 4
    trained, original = load_converted(first).state_dict(), load_converted(checkpoint).state_dict()
    assert max(float((trained[k] - original[k]).abs().max()) for k in trained) > 1e-4
    history = json.loads((first / "report.json").read_text())["finetune"]["history"]
    assert [p["step"] for p in history] == [0, 2, 4]
    # resuming a finished run trains nothing more and gives the same weights
    assert main([*args, "--out", str(second), "--resume", "--state-dir", str(state)]) == 0
    again = load_converted(second).state_dict()
    assert all(torch.equal(again[k], trained[k]) for k in trained)
    assert list(state.iterdir()) == []  # its files removed after success without --keep-state; a named folder stays
    assert "distilled 4 steps" in capsys.readouterr().out


def test_a_named_state_dir_keeps_the_users_files_and_itself(tmp_path, workspace) -> None:
    """Defect: ``finetune --state-dir DIR`` removed DIR after a successful run, whatever else the user kept there."""
    _, data, checkpoint = workspace
    state = tmp_path / "experiments"
    (state / "notes").mkdir(parents=True)
    (state / "notes" / "plan.md").write_text("years of work")
    (state / "run.log").write_text("mine")
    args = ["finetune", str(checkpoint), "--data", str(data), "--steps", "2", "--checkpoint-every", "1", *FAST]
    assert main([*args, "--out", str(tmp_path / "out"), "--state-dir", str(state)]) == 0
    assert (state / "notes" / "plan.md").read_text() == "years of work" and (state / "run.log").read_text() == "mine"
    assert sorted(p.name for p in state.iterdir()) == ["notes", "run.log"]  # state.pt and the manifest are gone


def test_a_state_dir_inside_the_output_is_refused_before_any_work(tmp_path, workspace, error_line) -> None:
    _, data, checkpoint = workspace
    out = tmp_path / "out"
    code = main(["finetune", str(checkpoint), "--data", str(data), "--out", str(out), "--state-dir",
                 str(out / "state")])
    assert code == 2 and "overlap" in error_line() and not out.exists()


def test_a_state_dir_that_is_the_checkpoint_is_refused_and_the_checkpoint_stays(tmp_path, workspace,
                                                                                error_line) -> None:
    """Defect: clean-up removed every file gn-convert had recorded in --state-dir, so ``--state-dir CHECKPOINT``
    deleted the checkpoint that was fine-tuned."""
    _, data, checkpoint = workspace
    before = sorted(p.name for p in checkpoint.iterdir())
    code = main(["finetune", str(checkpoint), "--data", str(data), "--out", str(tmp_path / "out"), "--state-dir",
                 str(checkpoint), *FAST])
    assert code == 2 and "overlap" in error_line() and sorted(p.name for p in checkpoint.iterdir()) == before


@pytest.mark.parametrize("option", ["--state-dir", "--synthetic-dir"])
def test_the_main_commands_folders_inside_the_output_are_refused_before_any_work(tmp_path, workspace, error_line,
                                                                                option: str) -> None:
    """Defect: a --state-dir or --synthetic-dir inside --out failed only at the final save, after the budget."""
    weights, data, _ = workspace
    out = tmp_path / "out"
    code = main(["resnet18", "--weights", str(weights), "--recover", "--data", str(data), "--budget", "5", option,
                 str(out / "inside"), "--out", str(out), "--no-onnx"])
    assert code == 2 and "overlap" in error_line() and not out.exists()


@pytest.mark.parametrize("problem", ["missing data", "empty data", "teacher mismatch", "corrupt checkpoint",
                                     "corrupt state", "no data for calibration"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, problem: str, workspace, error_line) -> None:
    weights, data, checkpoint = workspace
    args = ["finetune", str(checkpoint), "--data", str(data), "--steps", "2", "--out", str(tmp_path / "o"), *FAST]
    expected = {"missing data": "does not exist", "empty data": "holds no images", "teacher mismatch": "teacher",
                "corrupt checkpoint": "corrupt", "corrupt state": "corrupt", "no data for calibration": "--data"}
    if problem == "missing data":
        args[3] = str(tmp_path / "nowhere")
    elif problem == "empty data":
        (tmp_path / "empty").mkdir()
        args[3] = str(tmp_path / "empty")
    elif problem == "teacher mismatch":
        args += ["--teacher", "resnet34", "--teacher-weights", "none"]
    elif problem == "corrupt checkpoint":
        broken = tmp_path / "ck"
        broken.mkdir()
        (broken / "config.json").write_text((checkpoint / "config.json").read_text())
        (broken / "model.safetensors").write_bytes(b"\x00" * 64)
        args[1] = str(broken)
    elif problem == "corrupt state":
        state = tmp_path / "state"
        state.mkdir()
        state_path(state).write_bytes(b"truncated")
        args += ["--resume", "--state-dir", str(state)]
    else:
        args = ["resnet18", "--weights", str(weights), "--out", str(tmp_path / "o"), "--calibrate", "2"]
    assert main(args) == 2
    assert expected[problem] in error_line()
    assert not (tmp_path / "o").exists()



def test_finetune_of_an_untrained_conversion_needs_teacher_weights(tmp_path, workspace, error_line) -> None:
    """Defect: a checkpoint converted with --weights none was distilled from a new random
    teacher (a different one on every run) instead of refusing."""
    _, data, _ = workspace
    untrained = tmp_path / "untrained"
    assert main(["resnet18", "--weights", "none", "--out", str(untrained), "--no-onnx"]) == 0
    args = ["finetune", str(untrained), "--data", str(data), "--steps", "2", *FAST]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    line = error_line()
    assert "--teacher-weights" in line
    assert not (tmp_path / "o").exists()
    assert main([*args, "--out", str(tmp_path / "o2"), "--teacher-weights", str(workspace[0])]) == 0
    assert (tmp_path / "o2" / "model.safetensors").is_file()


def test_every_command_that_distils_refuses_an_untrained_teacher_by_one_rule(tmp_path, workspace, error_line) -> None:
    """Defect: finetune refused the weights *name* none, while --recover (and --finetune-steps) distilled from an
    untrained teacher and reported agreement 1.000; a file of untrained weights passed finetune too."""
    _, data, checkpoint = workspace
    untrained = tmp_path / "untrained.pt"
    torch.save(gn_convert.load_model("resnet18", "none").state_dict(), untrained)
    finetune = ["finetune", str(checkpoint), "--data", str(data), "--steps", "2", "--teacher-weights", str(untrained),
                "--out", str(tmp_path / "o"), *FAST]
    assert main(finetune) == 2
    assert "the teacher was never trained" in error_line()
    for stage in (["--recover", "--budget", "5"], ["--finetune-steps", "2"], ["--calibrate", "2"]):
        argv = ["resnet18", "--weights", "none", "--data", str(data), *stage, "--out", str(tmp_path / "o"), *FAST]
        assert main(argv) == 2
        line = error_line()
        assert "the teacher was never trained: its 20 BatchNorm layers hold their initial statistics" in line
        assert "(--weights FILE, or a pretrained weights name)" in line
    assert not (tmp_path / "o").exists()


def test_run_finetune_is_the_command_without_the_cli(tmp_path, workspace) -> None:
    """The finetune command's orchestration is a Python function (gn_convert.finetune.run_finetune)."""
    from gn_convert.finetune import FinetuneOptions, run_finetune

    _, data, checkpoint = workspace
    opts = FinetuneOptions(checkpoint, data=data, out=tmp_path / "py",
                           fidelity=dict(steps=2, input_size=16, batch_size=8, eval_every=2, holdout=0.2))
    report = run_finetune(opts)
    assert [p["step"] for p in report["finetune"]["history"]] == [0, 2]
    assert json.loads((tmp_path / "py" / "report.json").read_text())["finetune"]["steps"] == 2
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in load_converted(tmp_path / "py").modules()) == 20
    assert not (tmp_path / "py.train-state").exists()
