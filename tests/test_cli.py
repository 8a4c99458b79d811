"""The gn-convert command: the main job, `list`, and one clear line for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gn_convert
from gn_convert.cli import main


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_convert_writes_checkpoint_and_report(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "gn"
    code, stdout, _ = _run(capsys, "mobilenet_v3_small", "--groups", "32", "--weights", "none", "--out", str(out))
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == "mobilenet_v3_small" and report["weights"] == "none"
    assert len(report["plan"]["layers"]) == 34
    fallbacks = [layer for layer in report["plan"]["layers"] if layer["fallback"]]
    assert len(fallbacks) == 22 and report["plan"]["min_channels_per_group"] == 1  # the tests' bound (conftest)
    assert {(layer["num_channels"], layer["num_groups"]) for layer in fallbacks} == {
        (16, 16), (24, 24), (40, 20), (48, 24), (72, 24), (88, 22), (120, 30), (144, 24), (240, 30)}
    assert "34 BatchNorm layers -> GroupNorm" in stdout
    model = gn_convert.load_converted(out)
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 34
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _bad_input_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage")
    mismatched = tmp_path / "resnet18.pt"
    torch.save(gn_convert.load_model("resnet18", "none").state_dict(), mismatched)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {
        "unknown model": (["resnt50", "--weights", "none"], "unknown model 'resnt50'"),
        "groups 0": (["resnet18", "--weights", "none", "--groups", "0"], "groups must be >= 1"),
        "strict groups": (["resnet18", "--weights", "none", "--groups", "7", "--policy", "strict"],
                          "7 groups do not divide 64"),
        "corrupt weights": (["resnet18", "--weights", str(corrupt)], "corrupt"),
        "mismatched weights": (["resnet34", "--weights", str(mismatched)], "does not fit the model: missing"),
        "unwritable output": (["resnet18", "--weights", "none", "--out", str(a_file / "out")], "cannot write"),
        "output is a file": (["resnet18", "--weights", "none", "--out", str(a_file)], "is not a folder"),
        "no batchnorm": (["alexnet", "--weights", "none"], "no BatchNorm layer"),
    }


@pytest.mark.parametrize("case", ["unknown model", "groups 0", "strict groups", "corrupt weights",
                                  "mismatched weights", "unwritable output", "output is a file", "no batchnorm"])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    argv, expected = _bad_input_cases(tmp_path)[case]
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = _run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.startswith("gn-convert:")]
    assert code == 2
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "resnet18", "--weights", "none", "--out", str(out))
    assert code == 2 and "--force" in err and (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_console_script_lists_models_and_survives_a_closed_pipe() -> None:
    """Defect: a reader that goes away (`gn-convert list | head -1`) made the command exit 1.
    ``| true`` closes the pipe before the first write, so the broken pipe always happens;
    pipefail makes the pipeline's status gn-convert's own."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    listing = subprocess.run([sys.executable, "-m", "gn_convert", "list"], capture_output=True, text=True,
                             env=env, timeout=300)
    assert listing.returncode == 0
    lines = listing.stdout.splitlines()
    headings = [line for line in lines if not line.startswith("  ")]
    assert [h.split()[0] for h in headings] == ["classification", "segmentation", "detection", "video"]
    names = [line.strip() for line in lines if line.startswith("  ") and not line.strip().startswith("without")]
    assert sorted(names) == sorted(gn_convert.list_models())
    assert sum(int(h.split("(")[1].rstrip("):")) for h in headings) == len(names)
    closed = subprocess.run(["bash", "-o", "pipefail", "-c", f"{sys.executable} -m gn_convert list | true"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert closed.returncode == 0 and "error" not in closed.stderr.lower(), closed.stderr


def test_model_names_do_not_collide_with_commands() -> None:
    from gn_convert.cli import COMMANDS

    assert not set(COMMANDS) & set(gn_convert.list_models())


@pytest.mark.parametrize("argv", [["--groups", "8", "resnet18"], ["-v", "--groups", "8", "resnet18"],
                                  ["--weights", "none", "-g", "8", "resnet18", "--no-onnx"],
                                  ["resnet18", "--groups", "8"], ["convert", "--groups", "8", "resnet18"]])
def test_options_before_the_model_name_parse_as_the_main_command(argv: list[str]) -> None:
    """Defect: `gn-convert --groups 8 resnet18` took `8` for the model and failed to parse."""
    from gn_convert.cli import _with_default_command, build_parser

    args = build_parser().parse_args(_with_default_command(argv))
    assert (args.command, args.model, args.groups) == ("convert", "resnet18", 8)


@pytest.mark.parametrize(("argv", "command"), [(["list"], "list"), (["-v", "list"], "list"),
                                               (["-vv", "export", "gn-x", "-o", "x.onnx"], "export"),
                                               (["parity", "m.onnx", "--checkpoint", "ck"], "parity"),
                                               (["bench", "m.onnx", "--batch", "1"], "bench")])
def test_subcommands_still_parse_with_top_level_flags_first(argv: list[str], command: str) -> None:
    from gn_convert.cli import _with_default_command, build_parser

    assert build_parser().parse_args(_with_default_command(argv)).command == command


def test_main_command_runs_with_its_options_before_the_model_name(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o"
    code, stdout, _ = _run(capsys, "--groups", "8", "--weights", "none", "--no-onnx", "--out", str(out), "resnet18")
    assert code == 0 and "20 BatchNorm layers -> GroupNorm" in stdout
    config = json.loads((out / "config.json").read_text())
    assert {layer["num_groups"] for layer in config["plan"]["layers"]} == {8}



def _exit_code(argv: list[str]) -> int:
    """main()'s exit status, whether argparse exits (SystemExit) or main returns it."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code)


@pytest.mark.parametrize("value", ["-0.5", "1.5", "1", "half"])
def test_holdout_outside_zero_one_is_refused_by_argparse(value: str, tmp_path: Path, capsys) -> None:
    """Defect: --holdout -0.5 or 1.5 was accepted and failed later (or held out nothing)."""
    for argv in (["resnet18", "--weights", "none", "--out", str(tmp_path / "o")],
                 ["finetune", str(tmp_path / "ck"), "--data", str(tmp_path)]):
        assert _exit_code([*argv, "--holdout", value]) == 2
        err = capsys.readouterr().err
        assert "--holdout" in err and ("not in [0, 1)" in err or "is not a number" in err), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--data", "--eval-data"])
def test_data_without_a_stage_that_uses_it_is_refused(flag: str, tmp_path: Path, capsys) -> None:
    """Defect: `--data DIR` without --calibrate, --finetune-steps or --recover was silently ignored."""
    argv = ["resnet18", "--weights", "none", flag, str(tmp_path), "--out", str(tmp_path / "o")]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and "Traceback" not in err
    assert f"gn-convert: error: {flag} given, but no stage uses data: add --calibrate N, --finetune-steps N or " \
           f"--recover, or drop {flag}" in err.splitlines()
    assert not (tmp_path / "o").exists()


def test_groups_and_group_size_together_are_refused(tmp_path: Path, capsys) -> None:
    argv = ["resnet18", "--weights", "none", "--groups", "8", "--group-size", "4", "--out", str(tmp_path / "o")]
    assert _exit_code(argv) == 2
    assert "--groups and --group-size exclude each other" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_native_says_on_stderr_that_it_is_building_before_it_builds(monkeypatch, capsys, tmp_path: Path) -> None:
    """Defect: `gn-convert native` was silent for the 30 s of a first build."""
    from gn_convert.cli import native as cli_native

    seen: list[str] = []

    def build(*args, **kwargs) -> Path:
        seen.append(capsys.readouterr().err)  # what the user saw before the build started
        return tmp_path / "libgn_convert_ops.so"

    monkeypatch.setattr(cli_native, "build_library", build)
    assert main(["native"]) == 0
    assert len(seen) == 1 and seen[0].startswith("building the native GroupNorm kernel") and seen[0].count("\n") == 1
    assert capsys.readouterr().out.strip() == str(tmp_path / "libgn_convert_ops.so")


@pytest.mark.slow
def test_cli_recover_keeps_its_state_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture, nontrivial) -> None:
    from torchvision.utils import save_image

    from gn_convert.testing.photos import photo_crops

    photos = tmp_path / "photos"
    photos.mkdir()
    for index, crop in enumerate(photo_crops(12, 64, seed=3)):
        save_image(crop.clamp(0, 1), photos / f"p{index}.png")
    weights = tmp_path / "teacher.pt"  # statistics measured on photos: recover refuses an untrained teacher
    torch.save(nontrivial("mobilenet_v3_small").state_dict(), weights)
    state, out = tmp_path / "state", tmp_path / "gn"
    argv = ["mobilenet_v3_small", "--weights", str(weights), "--no-onnx", "--data", str(photos), "--recover",
            "--budget", "8", "--input-size", "64", "--state-dir", str(state), "--out", str(out)]
    assert _run(capsys, *argv)[0] == 0
    first = json.loads((out / "report.json").read_text())["recovery"]
    assert (state / "recover.pt").is_file() and [s["name"] for s in first["stages"]] == ["convert", "distill"]
    assert _run(capsys, *argv, "--resume", "--force")[0] == 0
    resumed = json.loads((out / "report.json").read_text())["recovery"]
    assert resumed["stages"][0]["seconds"] == first["stages"][0]["seconds"]  # finished stages are not run again
    assert _exit_code([*argv[:-4], "--resume", "--out", str(tmp_path / "other")]) == 2
    assert "--resume continues from --state-dir DIR" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_cli_recover_refuses_holdout_0_before_loading_anything(tmp_path: Path, capsys, error_line) -> None:
    """Defect: `--recover --holdout 0` was accepted (NaN scores, or a crash on a folder)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    argv = ["resnet18", "--weights", str(tmp_path / "missing.pt"), "--data", str(photos), "--recover",
            "--holdout", "0", "--out", str(tmp_path / "o")]
    assert _exit_code(argv) == 2
    line = error_line()  # about the holdout, not the missing weights file: refused before anything was loaded
    assert "holdout=0 holds no photo out" in line and "--holdout 0.1" in line and "--eval-data DIR" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stage", [["--calibrate", "2"], ["--recover"]])
def test_a_data_folder_without_images_is_refused_before_the_model_loads(tmp_path: Path, capsys, error_line,
                                                                       stage: list[str]) -> None:
    """--data was checked only after the model was loaded and converted."""
    (tmp_path / "empty").mkdir()
    code = main(["resnet18", "--weights", str(tmp_path / "missing.pt"), "--data", str(tmp_path / "empty"), *stage,
                 "--out", str(tmp_path / "gn")])
    assert code == 2 and "holds no images" in error_line()  # not the missing weights file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
