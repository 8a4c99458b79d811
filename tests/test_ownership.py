"""No user file is ever lost: --force and clean-up remove only the files gn-convert listed as its own,
overlapping outputs are refused, a symbolic link is written through, and a side file of another host
is never judged by a process number (gn_convert.ownership, gn_convert.output_folder)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

import gn_convert
from gn_convert.atomic import HOST, sweep_stale
from gn_convert.cli import main
from gn_convert.errors import OutputError
from gn_convert.output_folder import staged_folder
from gn_convert.ownership import MARKER, foreign, manifest, owned, remove_owned

CONVERT = ["resnet18", "--weights", "none", "--groups", "8", "--no-onnx"]


def tiny() -> tuple[nn.Module, gn_convert.GroupPlan]:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    plan = gn_convert.plan(model, 2)
    return gn_convert.convert(model, plan=plan), plan


def test_force_keeps_the_files_of_a_folder_save_once_wrote_into(tmp_path: Path) -> None:
    """Defect: save() adopted the user's project folder, and --force then deleted proj/src/train.py."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "train.py").write_text("print('mine')")
    model, plan = tiny()
    gn_convert.save(model, proj, plan=plan)
    assert manifest(proj) == {"config.json", "model.safetensors"} and foreign(proj) == ["src/train.py"]
    assert main([*CONVERT, "--out", str(proj), "--force"]) == 0
    assert (proj / "src" / "train.py").read_text() == "print('mine')"
    assert json.loads((proj / "config.json").read_text())["architecture"] == "resnet18"
    assert sorted(manifest(proj) or ()) == ["config.json", "model.safetensors", "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # nothing left beside it


def test_force_keeps_a_file_the_user_added_to_an_output_folder(tmp_path: Path) -> None:
    out = tmp_path / "gn"
    assert main([*CONVERT, "--out", str(out)]) == 0
    (out / "notes.txt").write_text("what I found")
    assert main([*CONVERT, "--out", str(out), "--force", "--format", "pt"]) == 0
    assert (out / "notes.txt").read_text() == "what I found"
    assert (out / "model.pt").exists() and not (out / "model.safetensors").exists()  # the old output is replaced


def test_save_never_overwrites_a_file_it_did_not_write(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"lr": 0.1}')
    model, plan = tiny()
    with pytest.raises(OutputError, match="config.json exists and gn-convert did not write it"):
        gn_convert.save(model, folder, plan=plan)
    assert (folder / "config.json").read_text() == '{"lr": 0.1}' and sorted(os.listdir(folder)) == ["config.json"]


def test_a_new_output_that_would_overwrite_a_users_file_is_refused_and_nothing_moves(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staged_folder(out) as tmp:
        (tmp / "model.onnx").write_text("old")
    (out / "report.json").write_text("the user's report")
    with pytest.raises(OutputError, match="report.json: a file or link gn-convert did not write is in its way"):
        with staged_folder(out, force=True) as tmp:
            (tmp / "report.json").write_text("new")
    assert (out / "report.json").read_text() == "the user's report" and (out / "model.onnx").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("where", ["inside", "equal", "around"])
def test_a_triton_repository_overlapping_the_output_is_refused_before_any_work(tmp_path: Path, where: str, capsys,
                                                                                 error_line) -> None:
    """Defect: a Triton repository inside --out was written into the staged output, then lost in the swap."""
    pytest.importorskip("tritonclient")
    out = tmp_path / "gn"
    repo = {"inside": out / "repo", "equal": out, "around": tmp_path}[where]
    argv = ["resnet18", "--weights", "none", "--groups", "8", "--out", str(out), "--triton-repo", str(repo)]
    assert main(argv) == 2
    assert "overlap" in error_line() and not out.exists()


def test_a_symlinked_output_is_written_where_it_points_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """Defect: the link itself was moved aside as ``.link.PID.old`` and left there for good."""
    target = tmp_path / "data" / "gn"
    target.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main([*CONVERT, "--out", str(link)]) == 0
    assert main([*CONVERT, "--out", str(link), "--force"]) == 0
    assert link.is_symlink() and link.resolve() == target.resolve() and (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "link"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["gn"]


def test_sweep_leaves_another_hosts_partial_alone(tmp_path: Path) -> None:
    """Defect: on a shared (NFS) folder a partial output was judged by a process number of another host."""
    dest = tmp_path / "out"
    other = tmp_path / f".out.{'x' + HOST}.{os.getpid() + 10**6}.partial"  # a process number no host here has
    mine = tmp_path / f".out.{HOST}.{os.getpid() + 10**6}.partial"
    other.mkdir()
    mine.mkdir()
    sweep_stale(dest)
    assert other.is_dir() and not mine.exists()
    assert HOST and set(HOST) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
    assert socket.gethostname().startswith(HOST[:3]) or "-" in HOST


def test_remove_owned_deletes_only_listed_files_and_a_named_folder_stays(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    (folder / "sub").mkdir(parents=True)
    torch.save({}, folder / "state.pt")
    (folder / "sub" / "ours.bin").write_bytes(b"1")
    (folder / "sub" / "theirs.txt").write_text("2")
    (folder / MARKER).write_text(json.dumps({"written_by": "gn-convert", "files": ["state.pt", "sub/ours.bin"]}))
    assert owned(folder) == {"state.pt", "sub/ours.bin"}
    assert remove_owned(folder, remove_folder=True) == ["sub/theirs.txt"]
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == ["sub", "sub/theirs.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    torch.save({}, empty / "state.pt")
    (empty / MARKER).write_text(json.dumps({"written_by": "gn-convert", "files": ["state.pt"]}))
    remove_owned(empty, remove_folder=False)
    assert empty.is_dir() and not list(empty.iterdir())


def test_remove_owned_of_named_files_keeps_gn_converts_other_files_and_their_record(tmp_path: Path) -> None:
    """A run's clean-up removes its own state files only: a checkpoint gn-convert wrote into the same folder stays,
    and stays gn-convert's (a later --force may still replace it)."""
    folder = tmp_path / "ck"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "state.pt"):
        (folder / name).write_text(name)
    (folder / MARKER).write_text(json.dumps({"written_by": "gn-convert",
                                             "files": ["config.json", "model.safetensors", "state.pt"]}))
    assert remove_owned(folder, remove_folder=True, only=["state.pt", "recover.pt"]) == ["config.json",
                                                                                          "model.safetensors"]
    assert manifest(folder) == {"config.json", "model.safetensors"} and folder.is_dir()


def test_a_state_file_the_user_wrote_is_never_replaced(tmp_path: Path) -> None:
    """Defect: a run's first save replaced a ``state.pt`` another tool kept in the folder, and claimed it."""
    from gn_convert.errors import CheckpointError
    from gn_convert.fidelity.distill.state import save_state, state_path

    folder = tmp_path / "shared"
    folder.mkdir()
    torch.save({"epoch": 7}, state_path(folder))
    with pytest.raises(CheckpointError, match="did not write it"):
        save_state(folder, {"step": 1})
    assert torch.load(state_path(folder), weights_only=True) == {"epoch": 7} and manifest(folder) is None
    fresh = tmp_path / "fresh"
    save_state(fresh, {"step": 1})
    save_state(fresh, {"step": 2})  # its own file: replaced
    assert torch.load(state_path(fresh), weights_only=True)["step"] == 2 and owned(fresh) == {"state.pt"}


def test_force_never_writes_through_a_users_link_to_a_folder_outside(tmp_path: Path) -> None:
    """Defect: a user's link ``1 -> elsewhere`` in a Triton model folder counted as one foreign entry named ``1``, so
    the merge of ``1/model.onnx`` saw no clash and wrote through the link into the user's folder."""
    out, outside = tmp_path / "repo" / "resnet", tmp_path / "user_store"
    with staged_folder(out, within=tmp_path / "repo") as tmp:
        (tmp / "1").mkdir()
        (tmp / "1" / "model.onnx").write_text("gn v1")
    outside.mkdir()
    (outside / "model.onnx").write_text("the user's model")
    (out / "1" / "model.onnx").unlink()
    (out / "1").rmdir()
    (out / "1").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutputError, match="in its way"):
        with staged_folder(out, force=True, within=tmp_path / "repo") as tmp:
            (tmp / "1").mkdir()
            (tmp / "1" / "model.onnx").write_text("gn v2")
    assert (outside / "model.onnx").read_text() == "the user's model" and (out / "1").is_symlink()
