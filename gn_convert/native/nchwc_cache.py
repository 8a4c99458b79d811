"""A disk cache of blocked-layout rewrites, so that opening the same model again skips onnxruntime's
optimisation and gn-convert's rewrite (:func:`gn_convert.native.nchwc.blocked_session`).

An entry is two files under ``CACHE_ROOT/nchwc/`` (:func:`gn_convert.native.headers.cache_root`,
``$GN_CONVERT_CACHE``): ``KEY.onnx``, the rewritten model, and ``KEY.npz``, its record, written
last (an entry without it is not one yet): the model's SHA-256, the number of GroupNorms moved, and
the probe, the first input of the full self-check (batch 1, seed 0, every input of the model) with
the outputs onnxruntime's own session of the original model gave on it.

The key hashes everything the rewritten file depends on: the model's bytes (and its external-data
files), onnxruntime's and onnx's versions, the kernel library's bytes, this CPU
(:func:`gn_convert.native.build.cpu_identity`: model and feature flags, hence the block size) and
the source of the rewrite (``nchwc.py`` and the graph pass), so that a changed pass never reuses
an old file. Entries are checked when read: a record that does not parse, a model whose hash
differs from its record, or a model that does not reproduce the probe is deleted, with a warning,
and rebuilt. Those checks catch corruption, not a consistent bad entry (a model and a record that
agree with each other, written by someone else): re-running the original model to compare would
cost the optimisation the cache saves. So the cache is used only in a folder that no one but this
user can write (owned by them, not writable by group or others); elsewhere (a shared cache) it is
skipped with a warning, and every model is rewritten and fully self-checked.

Size: at most ``$GN_CONVERT_NCHWC_CACHE_MB`` megabytes (default 2048; 0 turns the cache off), the
least recently used entries evicted first (a hit refreshes an entry's time). Opt out with
``GN_CONVERT_NO_NCHWC_CACHE=1`` or ``open_session(..., cache=False)``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from gn_convert.atomic import atomic_file
from gn_convert.errors import GnConvertError

log = logging.getLogger(__name__)

FOLDER = "nchwc"
NO_CACHE_VAR = "GN_CONVERT_NO_NCHWC_CACHE"
LIMIT_VAR = "GN_CONVERT_NCHWC_CACHE_MB"
DEFAULT_LIMIT_MB = 2048
FORMAT = 1
"""The record's layout; part of the key."""
REWRITE_SOURCES = (Path(__file__).with_name("nchwc.py"),
                   Path(__file__).parent.parent / "onnx" / "passes" / "blocked_layout.py")
"""The files that make the rewrite (read by path: importing them here would close an import cycle)."""
_EXTERNAL_MARK = b"\x0a\x08location\x12"
"""How an external-data reference (``StringStringEntryProto`` key ``location``) starts in a serialised
model: a file without these bytes has no external data, and is hashed without being parsed."""


@dataclass(frozen=True)
class Probe:
    """One input of the self-check and onnxruntime's own outputs on it (the original model's)."""

    feeds: dict[str, NDArray[Any]]
    outputs: list[NDArray[Any]]


@dataclass(frozen=True)
class Entry:
    """A cached rewrite: the model's bytes, the number of GroupNorms moved, and its probe."""

    data: bytes
    fused: int
    probe: Probe


def enabled(cache: bool = True) -> bool:
    """Whether the cache is used: ``cache``, no opt-out in the environment, a positive limit, and a
    folder only this user can write (:func:`private`)."""
    return cache and os.environ.get(NO_CACHE_VAR, "") in ("", "0") and limit_bytes() > 0 and private(folder())


def private(path: Path) -> bool:
    """Whether the cache folder ``path`` can be written by this user alone: owned by them and not writable
    by group or others (the cache makes it so: mode 0700). A folder not yet made counts as private
    (this process makes it). Warns once when not. Another user who could replace the whole folder
    (a writable parent) would leave one they own, which this refuses too."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        _warn_shared(path)
        return False
    return True


@functools.cache
def _warn_shared(path: Path) -> None:
    log.warning("not using the blocked-layout cache: %s can be written by others, and a consistent bad entry "
                "there could not be told from a good one; every model is rewritten and fully checked instead "
                "(point GN_CONVERT_CACHE at a private folder to use the cache)", path)


def limit_bytes() -> int:
    """The cache's size limit in bytes (``$GN_CONVERT_NCHWC_CACHE_MB``, default 2048 MB); a value that
    is not a whole number of megabytes is warned about and the default kept (a cache setting never
    fails a session)."""
    text = os.environ.get(LIMIT_VAR, "").strip() or str(DEFAULT_LIMIT_MB)
    if not text.isdigit():
        log.warning("%s must be a whole number of megabytes (0 turns the cache off), not %r; using %d",
                    LIMIT_VAR, text, DEFAULT_LIMIT_MB)
        text = str(DEFAULT_LIMIT_MB)
    return int(text) << 20


def folder() -> Path:
    """Where the entries lie: ``CACHE_ROOT/nchwc``."""
    from gn_convert.native.headers import cache_root

    return cache_root() / FOLDER


def model_digest(model: str | Path | bytes) -> str:
    """SHA-256 of a model: its bytes, and for a file the external-data files it names (in order)."""
    if isinstance(model, bytes):
        return hashlib.sha256(model).hexdigest()
    path = Path(model)
    digest = hashlib.sha256()
    data = path.read_bytes()
    digest.update(data)
    if _EXTERNAL_MARK in data:
        import onnx

        proto = onnx.load_from_string(data)  # parsed only: the external data stays where it is
        helper = onnx.external_data_helper
        tensors = [*proto.graph.initializer,
                   *(a.t for node in proto.graph.node for a in node.attribute if a.HasField("t"))]
        for location in sorted({helper.ExternalDataInfo(t).location for t in tensors if helper.uses_external_data(t)}):
            digest.update(location.encode() + b"\0")
            digest.update(_file_digest(path.parent / location).encode())
    return digest.hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return "missing"  # onnxruntime reports it when it loads the model
    return digest.hexdigest()


@functools.cache
def _rewrite_source() -> str:
    """The source of the rewrite (the session side and the graph pass): a changed pass is a new key."""
    return hashlib.sha256(b"".join(path.read_bytes() for path in REWRITE_SOURCES)).hexdigest()


def cache_key(model: str | Path | bytes, library: str | Path) -> str:
    """The entry's name: a hash of the model, onnxruntime's and onnx's versions, the library's bytes,
    this CPU, the rewrite's source and the record's format."""
    import onnx
    import onnxruntime as ort

    from gn_convert.native.build import cpu_identity

    parts = [model_digest(model), ort.__version__, onnx.__version__, _file_digest(Path(library)), cpu_identity(),
             _rewrite_source(), str(FORMAT)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _paths(key: str) -> tuple[Path, Path]:
    base = folder()
    return base / f"{key}.onnx", base / f"{key}.npz"


def lookup(key: str) -> Entry | None:
    """The entry under ``key``, or None. An entry that cannot be read, or whose model differs from its
    record, is deleted with a warning (and None returned: the caller rebuilds it)."""
    model_path, record_path = _paths(key)
    if not record_path.is_file():
        return None
    try:
        with np.load(record_path, allow_pickle=False) as record:
            meta = json.loads(str(record["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')}, not {FORMAT}")
            feeds = {name: record[f"in{k}"] for k, name in enumerate(meta["inputs"])}
            outputs = [record[f"out{k}"] for k in range(int(meta["outputs"]))]
        data = model_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise ValueError("the model file differs from its record")
        entry = Entry(data, int(meta["fused"]), Probe(feeds, outputs))
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        discard(key, f"it cannot be read ({type(err).__name__}: {err})")
        return None
    for path in (model_path, record_path):
        _touch(path)
    return entry


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache still serves hits; eviction order is then by write time


def discard(key: str, reason: str) -> None:
    """Delete the entry under ``key``, saying why (a warning: the cache held something wrong)."""
    log.warning("deleting the cached blocked-layout model %s: %s; rebuilding it", key, reason)
    for path in _paths(key):
        path.unlink(missing_ok=True)


def store(key: str, entry: Entry) -> bool:
    """Write ``entry`` under ``key`` (atomically, the record last), then evict the least recently used
    entries beyond the size limit; False (and a log line) where it cannot be written or alone exceeds
    the limit. A cache that cannot be written never fails the session."""
    limit = limit_bytes()
    model_path, record_path = _paths(key)
    if len(entry.data) > limit:
        log.info("not caching the blocked-layout model (%d MB, over the cache's %d MB)", len(entry.data) >> 20,
                 limit >> 20)
        return False
    meta = {"format": FORMAT, "fused": entry.fused, "sha256": hashlib.sha256(entry.data).hexdigest(),
            "inputs": list(entry.probe.feeds), "outputs": len(entry.probe.outputs)}
    arrays = {f"in{k}": value for k, value in enumerate(entry.probe.feeds.values())}
    arrays.update({f"out{k}": np.asarray(value) for k, value in enumerate(entry.probe.outputs)})
    try:
        model_path.parent.parent.mkdir(parents=True, exist_ok=True)
        model_path.parent.mkdir(mode=0o700, exist_ok=True)  # private: see the module docstring
        with atomic_file(model_path) as staged:
            staged.write_bytes(entry.data)
        with atomic_file(record_path) as staged, open(staged, "wb") as stream:
            np.savez(stream, meta=np.array(json.dumps(meta)), **arrays)
    except (OSError, GnConvertError) as err:
        log.warning("cannot cache the blocked-layout model in %s: %s", model_path.parent, err)
        return False
    evict(limit, keep=key)
    return True


def evict(limit: int, keep: str = "") -> list[str]:
    """Delete the least recently used entries until the cache holds at most ``limit`` bytes (never
    ``keep``); the keys deleted."""
    entries: dict[str, list[Path]] = {}
    try:
        files = [p for p in folder().iterdir() if p.suffix in (".onnx", ".npz") and not p.name.startswith(".")]
    except OSError:
        return []
    for path in files:
        entries.setdefault(path.stem, []).append(path)

    def stat(path: Path) -> tuple[float, int]:
        try:
            info = path.stat()
        except OSError:
            return 0.0, 0
        return info.st_mtime, info.st_size

    sizes = {key: sum(stat(p)[1] for p in paths) for key, paths in entries.items()}
    used = {key: max(stat(p)[0] for p in paths) for key, paths in entries.items()}
    total, removed = sum(sizes.values()), []
    for key in sorted(entries, key=lambda k: used[k]):
        if total <= limit:
            break
        if key == keep:
            continue
        for path in entries[key]:
            path.unlink(missing_ok=True)
        total -= sizes[key]
        removed.append(key)
        log.info("evicted the cached blocked-layout model %s (cache over %d MB)", key, limit >> 20)
    return removed
