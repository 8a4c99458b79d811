"""Outputs that appear whole or not at all: the one way gn-convert writes files.

Everything is written under a hidden temporary name beside its destination (same file system)
and renamed into place when complete:

- :func:`atomic_file`: one file (``.NAME.HOST.PID.tmp``).
- :func:`staged_files`: one artifact of several files (an ONNX model and its external data),
  staged in a folder ``.NAME.HOST.PID.partial`` and moved into place main file last.
- :func:`gn_convert.output_folder.staged_folder`: a whole output folder, staged the same way
  (see :mod:`gn_convert.output_folder` for how an existing folder is replaced).

A failed, interrupted (Ctrl-C) or terminated (SIGTERM: ``kill``, ``timeout``, a CI cancel,
``docker stop``) run leaves nothing behind: SIGTERM is turned into ``SystemExit`` for the
duration of the block, so the same clean-up runs. What a killed process (SIGKILL, power loss)
leaves is swept by the next run on the same host that writes the same destination: a partial of a
process that no longer runs is removed, and an ``.old`` folder whose destination is missing is put
back. Side names carry the host's name (``.NAME.HOST.PID.partial``), so a run never judges, by a
process number it cannot check, what a run on another host left in a shared (NFS) folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gn_convert.errors import OutputError
from gn_convert.file_system import current_umask

log = logging.getLogger(__name__)

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
"""This host's name as side names carry it."""


def output_error(path: Path, err: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {err.strerror or err}; choose a writable location")


def _apply_umask(path: Path) -> None:
    """Give ``path`` the mode a file created by ``open`` gets: ``0o666 & ~umask``, plus the executable
    bits its writer set (a compiled library), masked the same way."""
    umask = current_umask()
    os.chmod(path, (0o666 | (path.stat().st_mode & 0o111)) & ~umask)


def side_path(path: Path, kind: str) -> Path:
    """The side name of ``path`` for this process: ``.NAME.HOST.PID.KIND`` beside it."""
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{kind}")


def _side_pattern(path: Path) -> re.Pattern[str]:
    """Side names of ``path``: ``.NAME.HOST.PID.KIND``, or ``.NAME.PID.KIND`` from earlier versions."""
    return re.compile(rf"^\.{re.escape(path.name)}\.(?:(?P<host>[A-Za-z0-9-]+)\.)?(?P<pid>\d+)\."
                      r"(?P<kind>tmp|partial|old)$")


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

    Only side files of ``path`` written on this host (or, by earlier versions, with no host) whose
    process no longer runs are touched.
    """
    path = Path(path)
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return
    pattern = _side_pattern(path)
    for side in siblings:
        match = pattern.match(side.name)
        if not match or match["host"] not in (None, HOST) or _alive(int(match["pid"])) \
                or int(match["pid"]) == os.getpid():
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
    tmp = side_path(path, "tmp")
    try:
        with terminate_as_exit():
            yield tmp
            _apply_umask(tmp)
            os.replace(tmp, path)
    except OSError as err:
        raise output_error(path, err) from err
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
            OutputError: a file cannot be moved into place (files already moved are removed again, and the
                files they replaced put back: the previous artifact stays whole).
        """
        staged = sorted(self.folder.iterdir(), key=lambda p: p.name == self.destination.name)
        moved: list[Path] = []
        aside: list[tuple[Path, Path]] = []  # (a file this replaces, where it waits until the commit is whole)
        for source in staged:
            target = self.destination.parent / source.name
            try:
                if target.exists():
                    keep = self.folder / f".replaced.{source.name}"
                    os.replace(target, keep)
                    aside.append((target, keep))
                os.replace(source, target)
            except OSError as err:
                for done in moved:
                    done.unlink(missing_ok=True)
                for original, keep in aside:
                    with contextlib.suppress(OSError):
                        os.replace(keep, original)
                raise OutputError(f"cannot move {source.name} into {self.destination.parent}: "
                                  f"{err.strerror or err}") from err
            moved.append(target)
        for _, keep in aside:
            keep.unlink(missing_ok=True)
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
        folder = side_path(destination, "partial")
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
