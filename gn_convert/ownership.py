"""Which files in a folder gn-convert wrote, and removal that touches nothing else.

Every folder gn-convert writes into holds :data:`MARKER` (``.gn-convert``), a JSON manifest of the
files it wrote there (paths relative to the folder)::

    {"written_by": "gn-convert", "files": ["config.json", "model.safetensors", "report.json"]}

Replacing (``--force``) and clean-up delete from that list, never by inference: a file a user put
into the folder, or a folder gn-convert merely wrote into, is never removed. Folders of earlier
versions carry a marker without a list, or only a checkpoint's ``config.json``; there, only files
with the names gn-convert gives its outputs (:data:`LEGACY_NAMES`) count as its own.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".gn-convert"
"""The manifest every folder gn-convert writes into holds."""
LEGACY_NAMES = frozenset({
    "config.json", "model.safetensors", "model.pt", "model.onnx", "model.onnx.data", "report.json",
    "config.pbtxt", "labels.txt", "1/model.onnx", "1/model.onnx.data", "state.pt", "recover.pt",
})
"""The files an earlier gn-convert wrote into a folder it marked without a list of them."""


def _checkpoint_config(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and str(config.get("format", "")).startswith("gn-convert/")


def manifest(folder: str | Path) -> set[str] | None:
    """The files gn-convert says it wrote into ``folder`` (relative paths), or None for a folder it
    never marked. An earlier version's mark (a marker without a list, a checkpoint's ``config.json``)
    gives :data:`LEGACY_NAMES`."""
    folder = Path(folder)
    try:
        data = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        return set(LEGACY_NAMES) if _checkpoint_config(folder) else None
    except (OSError, ValueError):
        data = {}
    files = data.get("files") if isinstance(data, dict) else None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return set(files)
    return set(LEGACY_NAMES)


def files_in(folder: str | Path) -> set[str]:
    """Every file (and symbolic link) under ``folder``, as relative POSIX paths; the marker left out."""
    folder = Path(folder)
    found = set()
    for root, dirs, files in os.walk(folder):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.add(Path(root, name).relative_to(folder).as_posix())
    return found - {MARKER}


def owned(folder: str | Path) -> set[str]:
    """The files under ``folder`` that gn-convert wrote (listed in its manifest and present)."""
    listed = manifest(folder) or set()
    return files_in(folder) & listed


def foreign(folder: str | Path) -> list[str]:
    """The files under ``folder`` that gn-convert did not write, sorted."""
    return sorted(files_in(folder) - (manifest(folder) or set()))


def write_manifest(folder: str | Path, files: Iterable[str]) -> None:
    """Record ``files`` (relative paths) as gn-convert's in ``folder``'s manifest, replacing the list."""
    path = Path(folder) / MARKER
    tmp = path.with_name(f".{MARKER}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"written_by": "gn-convert", "files": sorted(set(files) - {MARKER})}) + "\n")
    os.replace(tmp, path)


def record(folder: str | Path, files: Iterable[str | Path]) -> None:
    """Add ``files`` (paths inside ``folder``, or relative to it) to ``folder``'s manifest."""
    folder = Path(folder)
    names = {(Path(f).relative_to(folder) if Path(f).is_absolute() else Path(f)).as_posix() for f in files}
    listed = manifest(folder)
    write_manifest(folder, (listed if listed is not None and (folder / MARKER).exists() else set()) | names)


def _prune(folder: Path, relative: str) -> None:
    """Remove the now-empty folders between ``folder`` and ``relative``'s file, innermost first."""
    parent = (folder / relative).parent
    while parent != folder and folder in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent


def remove_owned(folder: str | Path, *, remove_folder: bool, only: Iterable[str] | None = None) -> list[str]:
    """Delete the files gn-convert wrote under ``folder`` (those of them named in ``only``, when given) and,
    once none of its files is left, its manifest; nothing else.

    Args:
        folder: the folder.
        remove_folder: also remove ``folder`` itself when nothing is left in it (gn-convert created it).
        only: relative paths to remove, if gn-convert wrote them (a run's own state files): the other files
            gn-convert wrote there (an earlier output, a checkpoint) stay, and stay in the manifest.

    Returns:
        The files that were kept, sorted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    mine = owned(folder)
    doomed = mine if only is None else mine & set(only)
    for relative in sorted(doomed):
        (folder / relative).unlink(missing_ok=True)
        _prune(folder, relative)
    listed = manifest(folder) or set()
    if (folder / MARKER).exists() and listed - doomed:
        write_manifest(folder, listed - doomed)
    else:
        (folder / MARKER).unlink(missing_ok=True)
    kept = sorted(files_in(folder))
    if kept:
        log.info("kept %d file(s) in %s that gn-convert did not write", len(kept), folder)
    elif remove_folder:
        try:
            folder.rmdir()
        except OSError:
            pass
    return kept
