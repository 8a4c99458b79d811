"""Outputs that appear whole or not at all (``gn_convert.atomic``): a failed, interrupted or
terminated write leaves nothing, what a killed run left is swept, and a replaced folder is
never lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gn_convert.atomic import atomic_file, staged_files, sweep_stale
from gn_convert.errors import OutputError
from gn_convert.output_folder import check_output_folder, staged_folder
from gn_convert.ownership import MARKER

WRITER = """
import sys, time
from pathlib import Path
from gn_convert.atomic import atomic_file, staged_files
from gn_convert.output_folder import staged_folder
kind, dest = sys.argv[1], Path(sys.argv[2])
if kind == "folder":
    with staged_folder(dest, force=True) as tmp:
        (tmp / "model.onnx").write_text("half")
        print(tmp, flush=True)
        time.sleep(60)
elif kind == "files":
    with staged_files(dest) as stage:
        stage.path.write_text("half")
        (stage.folder / (dest.name + ".data")).write_text("weights")
        print(stage.folder, flush=True)
        time.sleep(60)
        stage.commit()
else:
    with atomic_file(dest) as tmp:
        tmp.write_text("half")
        print(tmp, flush=True)
        time.sleep(60)
"""


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


@pytest.mark.parametrize("kind", ["folder", "files", "file"])
def test_sigterm_during_a_staged_write_removes_the_partial(kind: str, tmp_path: Path) -> None:
    """Defect: SIGTERM (kill, timeout, a CI cancel) killed the writer without clean-up, leaving
    ``.NAME.PID.partial`` folders and ``.tmp`` files beside the destination."""
    dest = tmp_path / ("out" if kind == "folder" else "model.onnx")
    if kind == "folder":
        dest.mkdir()
        (dest / MARKER).write_text("{}")  # an earlier output of gn-convert's
        (dest / "keep.txt").write_text("the previous output")
    script = tmp_path.parent / f"{tmp_path.name}-writer.py"
    script.write_text(textwrap.dedent(WRITER))
    proc = subprocess.Popen([sys.executable, str(script), kind, str(dest)], stdout=subprocess.PIPE, text=True)
    try:
        partial = Path(proc.stdout.readline().strip())
        assert partial.exists() and partial.parent == tmp_path
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        script.unlink()
    assert not partial.exists()
    if kind == "folder":  # the folder being replaced is still there, unchanged
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert (dest / "keep.txt").read_text() == "the previous output"
    else:
        assert list(tmp_path.iterdir()) == []


def test_sweep_removes_what_dead_runs_left_and_keeps_live_ones(tmp_path: Path) -> None:
    dead, alive = _dead_pid(), os.getppid()
    dest = tmp_path / "out"
    (tmp_path / f".out.{dead}.partial").mkdir()
    (tmp_path / f".out.{dead}.partial" / "model.onnx").write_text("half")
    (tmp_path / f".out.{dead}.tmp").write_text("half")
    (tmp_path / f".out.{alive}.partial").mkdir()  # a run still going: not ours to remove
    (tmp_path / f".other.{dead}.partial").mkdir()  # another destination's
    sweep_stale(dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".out.{alive}.partial", f".other.{dead}.partial"])


def test_sweep_restores_a_folder_a_killed_run_had_moved_aside(tmp_path: Path) -> None:
    """A run killed between moving the old folder aside and moving the new one in left only
    ``.NAME.PID.old``: the next run puts it back."""
    dead = _dead_pid()
    aside = tmp_path / f".out.{dead}.old"
    aside.mkdir()
    (aside / "model.safetensors").write_text("the only copy")
    sweep_stale(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_text() == "the only copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # with the destination present, an .old of a dead run is stale and removed
    (tmp_path / f".out.{dead}.old").mkdir()
    sweep_stale(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replacing_a_folder_keeps_the_old_one_until_the_new_one_is_in_place(tmp_path: Path, monkeypatch) -> None:
    dest = tmp_path / "out"
    with staged_folder(dest) as tmp:  # a folder gn-convert wrote: --force may replace it
        (tmp / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_folder(dest, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("the run failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dest / "old.txt").exists()
    real_replace = os.replace

    def failing_second_move(src, dst):  # moving the new folder in fails after the old one moved aside
        if str(src).endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_move)
    with pytest.raises(OutputError, match="No space left"):
        with staged_folder(dest, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dest / "old.txt").read_text() == "old"
    with staged_folder(dest, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == [MARKER, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_existing_folder_needs_force_and_names_the_option(tmp_path: Path) -> None:
    dest = tmp_path / "repo"
    dest.mkdir()
    (dest / "x").write_text("x")
    with pytest.raises(OutputError, match="exists; pass --force .* another --triton-repo"):
        with staged_folder(dest, option="--triton-repo"):
            pass


def test_atomic_file_and_staged_files_leave_nothing_on_failure(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    with pytest.raises(ValueError):
        with staged_files(tmp_path / "new" / "m.onnx") as stage:
            stage.path.write_text("half")
            raise ValueError("check failed")
    assert list(tmp_path.iterdir()) == []
    with staged_files(tmp_path / "m.onnx") as stage:
        stage.path.write_text("model")
        (stage.folder / "m.onnx.data").write_text("weights")
        files = stage.commit()
    assert [p.name for p in files] == ["m.onnx", "m.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]


def test_a_commit_that_fails_halfway_leaves_the_previous_artifact_whole(tmp_path: Path, monkeypatch) -> None:
    """Defect: when the main file failed to move after its data file had, the rollback removed the new data file
    and the previous one was gone with it: the previous model.onnx was left without its weights."""
    import gn_convert.atomic as atomic

    for name, text in (("m.onnx", "old model"), ("m.onnx.data", "old weights")):
        (tmp_path / name).write_text(text)
    real = os.replace

    def failing(source, target):  # the main file's move fails, after its data file's
        if Path(target) == tmp_path / "m.onnx" and Path(source).name == "m.onnx":
            raise OSError(28, "No space left on device")
        return real(source, target)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OutputError, match="No space left"):
        with staged_files(tmp_path / "m.onnx") as stage:
            stage.path.write_text("new model")
            (stage.folder / "m.onnx.data").write_text("new weights")
            stage.commit()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"m.onnx": "old model",
                                                                   "m.onnx.data": "old weights"}


def test_force_replaces_only_folders_gn_convert_wrote(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputError, match="holds files gn-convert did not write; --force replaces only folders"):
        with staged_folder(mine, force=True):
            pass
    assert (mine / "thesis.tex").read_text() == "years of work"
    legacy = tmp_path / "legacy"  # a checkpoint of an earlier version, without the marker
    legacy.mkdir()
    (legacy / "config.json").write_text('{"format": "gn-convert/1"}')
    check_output_folder(legacy, force=True)


@pytest.mark.parametrize("where", [".", "..", "/"])
def test_the_current_folder_and_those_above_it_are_never_replaced(tmp_path: Path, monkeypatch, where: str) -> None:
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    (work / MARKER).write_text("{}")  # even a folder gn-convert wrote
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    with pytest.raises(OutputError, match="is the current folder or one above it"):
        with staged_folder(Path(where), force=True):
            pass
    assert (work / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("name", [".", "..", "sub/../..", "other"])
def test_a_folder_staged_within_a_repository_must_be_its_direct_child(tmp_path: Path, name: str) -> None:
    repo = tmp_path / "repo"
    (repo / "other").mkdir(parents=True)
    (repo / "sub").mkdir()
    target = repo / name if name != "other" else tmp_path / "outside"
    with pytest.raises(OutputError, match="is not a folder inside|current folder or one above"):
        with staged_folder(target, force=True, within=repo):
            pass
    assert (repo / "other").is_dir()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_written_atomically_get_the_users_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Defect: model.safetensors was 0600 (safetensors writes its file so) beside 0644 outputs."""
    import stat

    import torch

    import gn_convert
    from gn_convert.atomic import atomic_file

    old = os.umask(umask)
    try:
        with atomic_file(tmp_path / "private.bin") as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as a writer that ignores the umask
            os.close(fd)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
        layer_plan = gn_convert.plan(model, 2)
        gn_convert.save(gn_convert.convert(model, plan=layer_plan), tmp_path / "ck", plan=layer_plan)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "private.bin").stat().st_mode) == mode
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "ck" / name).stat().st_mode) == mode, name


@pytest.mark.skipif(not Path("/proc/self/mounts").exists(), reason="no /proc here")
def test_an_output_on_a_kernel_file_system_names_the_real_reason() -> None:
    """Defect: --out /proc/x said "cannot write under /proc (No such file or directory)"."""
    from gn_convert.errors import OutputError
    from gn_convert.output_folder import check_output_folder

    with pytest.raises(OutputError, match=r"^cannot write under /proc: it is on the kernel's proc file system, which "
                                          r"holds no files of its own; choose a writable --out$"):
        check_output_folder("/proc/gn-convert-out")
