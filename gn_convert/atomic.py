"""Outputs that appear whole or not at all: the one way gn-convert writes files.

Everything is written under a hidden temporary name beside its destination (same file system)
and renamed into place when complete:

- :func:`atomic_file`: one file (``.NAME.PID.tmp``).
- :func:`staged_files`: one artifact of several files (an ONNX model and its external data),
  staged in a folder ``.NAME.PID.partial`` and moved into place main file last.
- :func:`staged_folder`: a whole output folder (``.NAME.PID.partial``); an existing folder
  being replaced is first renamed ``.NAME.PID.old`` and removed only once the new one is in place.

Replacing touches only what gn-convert wrote: every staged folder carries a marker file
(:data:`MARKER`), and ``force`` replaces a non-empty folder only when it has that marker (or is a
checkpoint of an earlier version: a ``config.json`` of format ``gn-convert/...``). The current
folder, any folder above it and the file system's root are never replaced, and a folder staged
``within`` a parent (a model in a Triton repository) must be a direct child of it.

A failed, interrupted (Ctrl-C) or terminated (SIGTERM: ``kill``, ``timeout``, a CI cancel,
``docker stop``) run leaves nothing behind: SIGTERM is turned into ``SystemExit`` for the
duration of the block, so the same clean-up runs. What a killed process (SIGKILL, power loss)
leaves is swept by the next run that writes the same destination: a partial of a process that
no longer runs is removed, and an ``.old`` folder whose destination is missing is put back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gn_convert.errors import OutputError
from gn_convert.file_system import current_umask, unwritable_reason

log = logging.getLogger(__name__)

MARKER = ".gn-convert"
"""The file every folder gn-convert stages holds: what makes it replaceable with ``force``."""
_SIDE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?P<kind>tmp|partial|old)$")


def _output_error(path: Path, err: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {err.strerror or err}; choose a writable location")


def _apply_umask(path: Path) -> None:
    """Give ``path`` the mode a file created by ``open`` gets: ``0o666 & ~umask``, plus the executable
    bits its writer set (a compiled library), masked the same way."""
    umask = current_umask()
    os.chmod(path, (0o666 | (path.stat().st_mode & 0o111)) & ~umask)


def _side(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{kind}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale(path: str | Path) -> None:
    """Remove what killed runs left beside ``path``, and put back a folder they moved aside.

    Only side files of ``path`` whose process no longer runs are touched.
    """
    path = Path(path)
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    for side in siblings:
        match = _SIDE.match(side.name)
        if not match or match["name"] != path.name or _alive(int(match["pid"])) or int(match["pid"]) == os.getpid():
            continue
        if match["kind"] == "old" and not path.exists():
            log.warning("restoring %s, moved aside by a run that was killed", path)
            os.replace(side, path)
            continue
        log.info("removing %s, left by a run that was killed", side)
        if side.is_dir():
            shutil.rmtree(side, ignore_errors=True)
        else:
            side.unlink(missing_ok=True)


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)`` so that clean-up code runs.

    Only in the main thread, and only where SIGTERM still has its default action (a program
    that installed its own handler keeps it). The previous handler is restored afterwards.
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The file gets the user's umask (``0o666 & ~umask``, executable bits kept where the writer set
    them), as a file opened directly would, whatever mode the writer created the temporary with
    (safetensors writes 0600).

    Raises:
        OutputError: the destination cannot be written.
    """
    path = Path(path)
    sweep_stale(path)
    tmp = _side(path, "tmp")
    try:
        with terminate_as_exit():
            yield tmp
            _apply_umask(tmp)
            os.replace(tmp, path)
    except OSError as err:
        raise _output_error(path, err) from err
    finally:
        tmp.unlink(missing_ok=True)


class Stage:
    """The staging folder of one multi-file artifact (see :func:`staged_files`)."""

    def __init__(self, destination: Path, folder: Path) -> None:
        self.destination, self.folder = destination, folder

    @property
    def path(self) -> Path:
        """Where to write the main file while staging."""
        return self.folder / self.destination.name

    def commit(self) -> list[Path]:
        """Move every staged file into the destination's folder, the main file last.

        Returns:
            The final paths, the main file first.

        Raises:
            OutputError: a file cannot be moved into place (files already moved are removed again).
        """
        staged = sorted(self.folder.iterdir(), key=lambda p: p.name == self.destination.name)
        moved: list[Path] = []
        for source in staged:
            target = self.destination.parent / source.name
            try:
                os.replace(source, target)
            except OSError as err:
                for done in moved:
                    done.unlink(missing_ok=True)
                raise OutputError(f"cannot move {source.name} into {self.destination.parent}: "
                                  f"{err.strerror or err}") from err
            moved.append(target)
        return moved[-1:] + moved[:-1]


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        folder.mkdir()
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first
        try:
            folder.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def staged_files(destination: str | Path) -> Iterator[Stage]:
    """Stage the files of one artifact beside ``destination``; nothing appears until ``commit``.

    Usage::

        with staged_files("out/model.onnx") as stage:
            write(stage.path)           # and any side files in stage.folder
            files = stage.commit()      # moved into out/

    Parent folders this creates are removed again if the block fails.

    Raises:
        OutputError: the destination is a folder, or its folder cannot be created or written.
    """
    destination = Path(destination)
    if destination.is_dir():
        raise OutputError(f"cannot write {destination}: it is a folder; give a file path such as model.onnx")
    created: list[Path] = []
    try:
        created = _make_parents(destination.parent)
        sweep_stale(destination)
        folder = _side(destination, "partial")
        folder.mkdir()
    except OSError as err:
        _remove_empty(created)
        raise OutputError(f"cannot write {destination}: {err.strerror or err}; choose a writable folder") from err
    try:
        with terminate_as_exit():
            yield Stage(destination, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        _remove_empty(created)
        raise
    shutil.rmtree(folder, ignore_errors=True)


def written_by_gn_convert(folder: Path) -> bool:
    """Whether ``folder`` was written by gn-convert: it holds :data:`MARKER`, or it is a checkpoint
    of an earlier version (``config.json`` of format ``gn-convert/...``)."""
    if (folder / MARKER).is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and str(config.get("format", "")).startswith("gn-convert/")


def _refuse_protected(path: Path, option: str, within: Path | None) -> None:
    """Refuse destinations that replacing would wreck: the current folder or one above it, the
    root, or (with ``within``) anything but a direct child of ``within``."""
    real = path.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents or real == real.parent:
        raise OutputError(f"{path} is the current folder or one above it; gn-convert never replaces it: choose a new "
                          f"folder for {option}")
    if within is not None and real.parent != within.resolve():
        raise OutputError(f"{path} is not a folder inside {within}; choose a plain name for {option}")


def check_output_folder(path: str | Path, force: bool = False, option: str = "--out",
                        within: str | Path | None = None) -> Path:
    """Fail fast, before any work, if ``path`` cannot become a new output folder.

    Args:
        path: the folder to create or replace.
        force: whether an existing non-empty folder that gn-convert wrote may be replaced.
        option: how the user chose ``path``, for the messages (``--out``, ``--triton-repo``).
        within: the folder ``path`` must lie directly in (a Triton repository), or None.

    Raises:
        OutputError: ``path`` exists (and ``force`` is False, or gn-convert did not write it), is
            a file, is the current folder or above it (or outside ``within``), or its parent is
            not a writable folder.
    """
    path = Path(path).absolute()
    _refuse_protected(path, option, Path(within).absolute() if within is not None else None)
    sweep_stale(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a folder; choose another {option}")
    if path.exists() and any(path.iterdir()):
        if not force:
            raise OutputError(f"output folder {path} exists; pass --force to replace it or choose another {option}")
        if not written_by_gn_convert(path):
            raise OutputError(f"output folder {path} holds files gn-convert did not write; --force replaces only "
                              f"folders gn-convert wrote: choose another {option}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:  # a real probe: permission bits say nothing for root, or on read-only mounts
        tempfile.TemporaryDirectory(dir=parent, prefix=".gn-convert-probe-").cleanup()
    except OSError as err:
        raise OutputError(f"cannot write under {parent}: {unwritable_reason(parent, err)}; choose a writable "
                          f"{option}") from err
    return path


@contextlib.contextmanager
def staged_folder(path: str | Path, force: bool = False, option: str = "--out",
                  within: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block succeeds.

    On failure (an exception, Ctrl-C or SIGTERM) the temporary folder is removed and ``path``
    is left as it was. An existing ``path`` is renamed aside, not deleted, until the new folder
    is in place; if the swap itself fails it is put back. The folder gets :data:`MARKER`.

    Raises:
        OutputError: see :func:`check_output_folder` (checked again here, just before writing),
            or the folder cannot be created.
    """
    path = check_output_folder(path, force, option, within)
    tmp = _side(path, "partial")
    try:
        tmp.mkdir(parents=True, exist_ok=False)
        (tmp / MARKER).write_text(json.dumps({"written_by": "gn-convert"}) + "\n")
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _output_error(path, err) from err
    try:
        with terminate_as_exit():
            yield tmp
            _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, path: Path) -> None:
    """Put folder ``new`` at ``path``; an existing ``path`` is kept aside until then."""
    old = _side(path, "old")
    try:
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(new, path)
        except OSError:
            if old.exists():
                os.replace(old, path)
            raise
    except OSError as err:
        raise _output_error(path, err) from err
    shutil.rmtree(old, ignore_errors=True)
