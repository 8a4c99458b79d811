"""Outputs that appear whole or not at all.

Every file gn-convert writes goes to a temporary name beside its destination and is renamed
into place when complete, so an interrupted or failed run never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError


def _output_error(path: Path, err: OSError) -> OutputError:
    return OutputError(f"cannot write {path}: {err.strerror or err}; choose a writable location")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    Raises:
        OutputError: the destination cannot be written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise _output_error(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def check_output_folder(path: str | Path, force: bool = False) -> Path:
    """Fail fast, before any work, if ``path`` cannot become a new output folder.

    Raises:
        OutputError: ``path`` exists (and ``force`` is False), is a file, or its parent is not
            a writable folder.
    """
    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise OutputError(f"output {path} exists and is not a folder; choose another --out")
    if path.exists() and any(path.iterdir()) and not force:
        raise OutputError(f"output folder {path} exists; pass --force to replace it or choose another --out")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:  # a real probe: permission bits say nothing for root, or on read-only mounts
        tempfile.TemporaryDirectory(dir=parent, prefix=".gn-convert-probe-").cleanup()
    except OSError as err:
        raise OutputError(f"cannot write under {parent} ({err.strerror or err}); choose a writable --out") from None
    return path


@contextlib.contextmanager
def staged_folder(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block succeeds.

    On failure the temporary folder is removed and ``path`` is left as it was.

    Raises:
        OutputError: see :func:`check_output_folder`, or the folder cannot be created.
    """
    path = check_output_folder(path, force)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.mkdir(parents=True, exist_ok=False)
    except OSError as err:
        raise _output_error(path, err) from None
    try:
        yield tmp
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
