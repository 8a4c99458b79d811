"""Output folders that appear whole or not at all, and replace only what gn-convert wrote.

:func:`staged_folder` stages a whole output folder under a temporary name beside it
(``.NAME.HOST.PID.partial``, as :mod:`gn_convert.atomic` stages files) and moves it into place when
the block succeeds; :func:`check_output_folder` refuses, before any work, a destination that cannot
become one.

Replacing touches only what gn-convert wrote: every staged folder carries a manifest of the files
gn-convert put there (:data:`MARKER`, :mod:`gn_convert.ownership`), and ``force`` replaces a
non-empty folder only when it has one (or is a checkpoint of an earlier version). A folder that
holds nothing else is swapped whole; where a user's files sit beside gn-convert's, only the listed
files are replaced, one by one, and the user's stay. The current folder, any folder above it and
the file system's root are never replaced, and a folder staged ``within`` a parent (a model in a
Triton repository) must be a direct child of it. An output given as a symbolic link is written
where the link points (the link stays).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from gn_convert.atomic import output_error, side_path, sweep_stale, terminate_as_exit
from gn_convert.errors import OutputError
from gn_convert.file_system import unwritable_reason
from gn_convert.ownership import MARKER, files_in, foreign, manifest, owned, write_manifest

log = logging.getLogger(__name__)


def written_by_gn_convert(folder: Path) -> bool:
    """Whether gn-convert wrote into ``folder``: it holds a manifest (:data:`MARKER`), or it is a
    checkpoint of an earlier version (``config.json`` of format ``gn-convert/...``)."""
    return manifest(folder) is not None


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


def refuse_overlap(first: Path, first_option: str, second: Path, second_option: str) -> None:
    """Refuse two output locations of one run where one lies inside the other (or they are one folder):
    replacing one would delete or swallow the other.

    Raises:
        OutputError: they overlap.
    """
    a, b = Path(first).resolve(), Path(second).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise OutputError(f"{first_option} {first} and {second_option} {second} overlap (one lies inside the other); "
                          "choose separate folders")


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
    if path.is_symlink():
        path = path.resolve()  # write where the link points; the link stays
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
        kept = foreign(path)
        if kept:
            log.info("%s: %d file(s) gn-convert did not write stay (%s)", path, len(kept), ", ".join(kept[:3]))
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
    is left as it was. What gn-convert wrote in an existing ``path`` is moved aside, not deleted,
    until the new files are in place; if the swap itself fails it is put back. Files of ``path``
    gn-convert did not write stay where they are. The folder gets a manifest (:data:`MARKER`)
    listing the files the block wrote.

    Raises:
        OutputError: see :func:`check_output_folder` (checked again here, just before writing),
            or the folder cannot be created.
    """
    path = check_output_folder(path, force, option, within)
    tmp = side_path(path, "partial")
    try:
        tmp.mkdir(parents=True, exist_ok=False)
        write_manifest(tmp, ())
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise output_error(path, err) from err
    try:
        with terminate_as_exit():
            yield tmp
            write_manifest(tmp, files_in(tmp))
            _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(new: Path, path: Path) -> None:
    """Put folder ``new`` at ``path``. An existing ``path`` that holds only gn-convert's files is
    swapped whole (kept aside until then); one that holds other files too keeps them, and only
    gn-convert's files are replaced (:func:`_merge_in`)."""
    if path.exists() and foreign(path):
        _merge_in(new, path)
        return
    old = side_path(path, "old")
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
        raise output_error(path, err) from err
    shutil.rmtree(old, ignore_errors=True)


def _move(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, target)


def _merge_in(new: Path, path: Path) -> None:
    """Replace the files gn-convert wrote in ``path`` by ``new``'s, file by file; every other file stays.

    Raises:
        OutputError: a file of ``new`` would overwrite one gn-convert did not write (nothing moved),
            or a move fails (every move undone).
    """
    incoming, others = files_in(new), set(foreign(path))
    # a user's file (or link: a linked folder counts as one entry) at a written file's path or at a folder above it
    clash = sorted(i for i in incoming if i in others or any(p.as_posix() in others for p in PurePosixPath(i).parents))
    if clash:
        raise OutputError(f"cannot write {path / clash[0]}: a file or link gn-convert did not write is in its way; move "
                          "it or choose another output folder")
    aside, done = side_path(path, "old"), []  # (from, to) pairs, in the order they were made
    try:
        aside.mkdir()
        for relative in sorted(owned(path)) + [MARKER]:
            if (path / relative).exists():
                _move(path / relative, aside / relative)
                done.append((path / relative, aside / relative))
        for relative in sorted(incoming) + [MARKER]:
            _move(new / relative, path / relative)
            done.append((new / relative, path / relative))
    except OSError as err:
        for source, target in reversed(done):
            with contextlib.suppress(OSError):
                _move(target, source)
        shutil.rmtree(aside, ignore_errors=True)
        raise output_error(path, err) from err
    shutil.rmtree(aside, ignore_errors=True)
    log.info("replaced gn-convert's files in %s; %d other file(s) stay", path, len(foreign(path)))
