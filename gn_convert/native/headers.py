"""Finding onnxruntime's C/C++ API headers, which the native kernel is compiled against.

onnxruntime's Python wheel ships no headers. They come, in this order, from:

1. ``GN_CONVERT_ORT_INCLUDE`` (or the ``include`` argument): a folder holding
   ``onnxruntime_cxx_api.h``, e.g. the ``include/`` folder of an onnxruntime release archive;
2. the system include folders (``/usr/include/onnxruntime``, ``/usr/local/include/onnxruntime``,
   ``/usr/local/include``), where a packaged onnxruntime puts them;
3. gn-convert's cache (``$GN_CONVERT_CACHE/ort-headers``, default ``~/.cache/gn_convert/ort-headers``),
   filled by 4;
4. a registry package that carries Microsoft's headers: the npm package
   ``com.github.asus4.onnxruntime`` (about 150 MB; its iOS framework carries them), fetched
   once with ``npm pack`` when ``npm`` is on the PATH (never where ``GN_CONVERT_NO_FETCH`` is
   set: an offline build machine, the test suite).

Supply chain. Source 4 is a third-party repackaging, so nothing in it is trusted by name: the
archive's SHA-512 is pinned (:data:`ARCHIVE_SHA512`, the registry's own ``dist.integrity``,
checked against the bytes downloaded) and verified before anything is extracted, and each
header the kernel compiles against is pinned by SHA-256 (:data:`HEADER_SHA256`), checked on
extraction and again every time the cache (3) is used; a cache that no longer matches is
fetched again. Folders a user names (1) or a system package installed (2) are the user's
choice and are not checked. Official sources checked for these headers (2026-12): onnxruntime's
GitHub release archives and the ``Microsoft.ML.OnnxRuntime`` NuGet package carry them but are not
reachable from the registry-only build machines this project targets; Microsoft's npm packages
(``onnxruntime-node`` 1.22.0: 44 files, no ``.h``; ``onnxruntime-web``, ``onnxruntime-common``)
and PyPI's ``onnxruntime`` wheels carry none. Where the GitHub archive is reachable, its
``include/`` folder is the better source: download it and set ``GN_CONVERT_ORT_INCLUDE``.

Headers work with any onnxruntime whose C API version is at least theirs
(``ORT_API_VERSION``); the version is checked before building.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from gn_convert.errors import NativeBuildError

ENV_VAR = "GN_CONVERT_ORT_INCLUDE"
REQUIRED = ("onnxruntime_c_api.h", "onnxruntime_cxx_api.h", "onnxruntime_cxx_inline.h",
            "onnxruntime_lite_custom_op.h", "onnxruntime_float16.h")
"""The headers the kernel includes, directly or through the C++ wrapper."""
SYSTEM_DIRS = ("/usr/include/onnxruntime", "/usr/local/include/onnxruntime", "/usr/local/include")
NPM_PACKAGE = "com.github.asus4.onnxruntime@0.4.9"
"""npm package carrying onnxruntime's official headers (C API version 29, MIT licensed)."""
_NPM_HEADER_DIR = "Headers/"
ARCHIVE_SHA512 = "BkzxduSZ9IkeDP6Q8lz2TFU2ie7hSSvS7ZIfzMooExoq0CNzJnuuGaUJ7IsojBgqO4ouD1jXah8OYyJbCN29Fg=="
"""SHA-512 (base64, npm's ``dist.integrity``) of the ``com.github.asus4.onnxruntime-0.4.9.tgz`` archive."""
HEADER_SHA256 = {
    "onnxruntime_c_api.h": "acc0cf4b3f28d39339c76770d76164bb7a0637dc89f5fde764b4017b632f6743",
    "onnxruntime_ep_c_api.h": "e6c986c9e98583f8113b2c6bc3864814883b806d501cf24da4d239c45753e235",
    "onnxruntime_error_code.h": "5ce3b054e798eced8d14f5b86e98692fd33470463f96194ce0700a2d53dd8721",
    "onnxruntime_cxx_api.h": "9c63ed5bf0427ddf1c10a99aca0beeec77318ce77d2ea6f7ae76d7d933660f67",
    "onnxruntime_cxx_inline.h": "c508dbb7d8203003a2584b8712118cb88e5b4ef1e1c7876a9974156fb7489301",
    "onnxruntime_float16.h": "88b242845d25981633a0bbd1c148e273cf8bfb016ea3f57c4af41a06530f72b0",
    "onnxruntime_lite_custom_op.h": "5ac84897a95ee5fa5b5bbbeb84dd51f0768e83b293716b147f114e63b28fdf85",
}
"""SHA-256 of every header the kernel's build includes, directly or through another (``onnxruntime_c_api.h``
includes ``onnxruntime_ep_c_api.h`` and ``onnxruntime_error_code.h``), as that archive ships them. The
cache holds these files and no others, so a header outside the pinned set cannot be compiled in
(``tests/test_native.py`` lists the build's includes with ``-MM`` and checks them against this map)."""
PINNED_API = 29
"""The C API version of the pinned headers; ``pyproject.toml``'s onnxruntime floor is at least 1.{PINNED_API}."""
log = logging.getLogger(__name__)


CACHE_VAR = "GN_CONVERT_CACHE"
NO_FETCH_VAR = "GN_CONVERT_NO_FETCH"


def cache_root() -> Path:
    """gn-convert's cache folder: ``$GN_CONVERT_CACHE``, else ``$XDG_CACHE_HOME/gn_convert``, default
    ``~/.cache/gn_convert`` (headers and kernel builds)."""
    if os.environ.get(CACHE_VAR):
        return Path(os.environ[CACHE_VAR])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gn_convert"


def has_headers(folder: Path) -> bool:
    """Whether ``folder`` holds every header the kernel needs."""
    return all((folder / name).is_file() for name in REQUIRED)


def api_version(folder: Path) -> int:
    """The ``ORT_API_VERSION`` the headers in ``folder`` declare.

    Raises:
        NativeBuildError: the C API header has no version line.
    """
    text = (folder / "onnxruntime_c_api.h").read_text(errors="replace")
    match = re.search(r"^#define\s+ORT_API_VERSION\s+(\d+)", text, re.MULTILINE)
    if match is None:
        raise NativeBuildError(f"{folder / 'onnxruntime_c_api.h'} declares no ORT_API_VERSION; "
                               f"point {ENV_VAR} at onnxruntime's own include folder")
    return int(match.group(1))


def archive_digest(path: Path) -> str:
    """The SHA-512 of a file, base64-encoded as npm's ``dist.integrity`` writes it."""
    digest = hashlib.sha512()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


def mismatched_headers(folder: Path) -> list[str]:
    """The required headers in ``folder`` whose SHA-256 differs from :data:`HEADER_SHA256` (or that are missing)."""
    return [name for name, expected in HEADER_SHA256.items()
            if not (folder / name).is_file() or hashlib.sha256((folder / name).read_bytes()).hexdigest() != expected]


def _remove_unpinned(folder: Path) -> None:
    """Delete headers in gn-convert's cache that are not pinned (an earlier version extracted every
    header of the archive): a build must not include a file nobody checked."""
    for path in folder.glob("*.h"):
        if path.name not in HEADER_SHA256:
            log.info("removing %s from the header cache: it is not one of the pinned headers", path.name)
            path.unlink()


def runtime_api_version() -> int:
    """The newest C API version the installed onnxruntime serves (its minor version number)."""
    import onnxruntime

    return int(onnxruntime.__version__.split(".")[1])


def fetch_headers(dest: Path) -> Path:
    """Fetch the headers from the npm registry into ``dest`` (created whole or not at all).

    Returns:
        ``dest``.

    Raises:
        NativeBuildError: ``npm`` is missing, the download fails, or the package lacks a header.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise NativeBuildError(f"onnxruntime's C++ headers are not installed and npm is not there to fetch "
                               f"them; download an onnxruntime release and set {ENV_VAR} to its include/ folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".ort-headers-") as tmp:
        try:
            done = subprocess.run([npm, "pack", NPM_PACKAGE, "--silent", "--pack-destination", tmp,
                                   "--cache", str(Path(tmp) / "npm-cache")],  # no 150 MB left in ~/.npm
                                  capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            raise NativeBuildError(f"`npm pack {NPM_PACKAGE}` gave no answer in 15 minutes; set {ENV_VAR} "
                                   "to an onnxruntime include/ folder instead") from None
        archives = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not archives:
            reason = (done.stderr.strip().splitlines() or ["no archive written"])[-1]
            raise NativeBuildError(f"fetching onnxruntime's headers with `npm pack {NPM_PACKAGE}` failed "
                                   f"({reason}); set {ENV_VAR} to an onnxruntime include/ folder instead")
        found = archive_digest(archives[0])
        if found != ARCHIVE_SHA512:
            raise NativeBuildError(f"the downloaded {NPM_PACKAGE} archive does not match its pinned SHA-512 "
                                   f"(expected {ARCHIVE_SHA512[:16]}..., got {found[:16]}...); refusing to use it. "
                                   f"Set {ENV_VAR} to the include/ folder of an official onnxruntime release")
        staged = Path(tmp) / "headers"
        staged.mkdir()
        with tarfile.open(archives[0], "r:gz") as archive:
            for member in archive:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and _NPM_HEADER_DIR in member.name and name in HEADER_SHA256 \
                        and not (staged / name).exists():
                    source = archive.extractfile(member)
                    if source is not None:
                        (staged / name).write_bytes(source.read())
        if not has_headers(staged) or mismatched_headers(staged):
            raise NativeBuildError(f"npm package {NPM_PACKAGE} lacks onnxruntime's C++ headers or they differ from "
                                   f"the pinned ones ({', '.join(mismatched_headers(staged))}); "
                                   f"set {ENV_VAR} to an onnxruntime include/ folder")
        if has_headers(dest) and not mismatched_headers(dest):  # another process fetched them meanwhile
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    return dest


def find_headers(include: str | Path | None = None, fetch: bool = True) -> Path:
    """Locate onnxruntime's headers (see the module docstring for the order).

    Args:
        include: a folder to use instead of the search (overrides ``GN_CONVERT_ORT_INCLUDE``).
        fetch: fetch them from the npm registry when found nowhere else (never where
            ``GN_CONVERT_NO_FETCH`` is set).

    Returns:
        The folder holding them.

    Raises:
        NativeBuildError: a given folder lacks them, or none was found (and fetching was off or failed).
    """
    fetch = fetch and not os.environ.get(NO_FETCH_VAR)
    given = include if include is not None else os.environ.get(ENV_VAR)
    if given:
        folder = Path(given)
        if not has_headers(folder):
            missing = [name for name in REQUIRED if not (folder / name).is_file()]
            raise NativeBuildError(f"{folder} lacks {', '.join(missing)}; point {ENV_VAR} (or --include) at "
                                   "the include/ folder of an onnxruntime release")
        return folder
    for candidate in map(Path, SYSTEM_DIRS):
        if has_headers(candidate):
            return candidate
    cached = cache_root() / "ort-headers"
    if cached.is_symlink():  # a folder gn-convert did not make: read it, never prune or replace it
        if has_headers(cached) and not mismatched_headers(cached):
            return cached
        raise NativeBuildError(f"{cached} is a link to a folder gn-convert does not manage and its headers are not "
                               f"the pinned ones; set {ENV_VAR} to that folder, or remove the link")
    if has_headers(cached):
        changed = mismatched_headers(cached)
        if not changed:
            _remove_unpinned(cached)
            return cached
        log.warning("cached onnxruntime headers %s differ from the pinned ones (%s); fetching them again",
                    cached, ", ".join(changed))
        if not fetch:
            raise NativeBuildError(f"the cached headers in {cached} differ from the pinned ones ({', '.join(changed)}); "
                                   "delete the folder, or allow fetching them again")
    if not fetch:
        raise NativeBuildError(f"onnxruntime's C++ headers were not found; set {ENV_VAR} to an onnxruntime "
                               f"include/ folder, or allow fetching them from npm (`gn-convert native` without "
                               f"--no-fetch and {NO_FETCH_VAR})")
    return fetch_headers(cache_root() / "ort-headers")
