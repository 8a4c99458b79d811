"""Finding onnxruntime's C/C++ API headers, which the native kernel is compiled against.

onnxruntime's Python wheel ships no headers. They come, in this order, from:

1. ``GN_CONVERT_ORT_INCLUDE`` (or the ``include`` argument): a folder holding
   ``onnxruntime_cxx_api.h``, e.g. the ``include/`` folder of an onnxruntime release archive;
2. the system include folders (``/usr/include/onnxruntime``, ``/usr/local/include/onnxruntime``,
   ``/usr/local/include``), where a packaged onnxruntime puts them;
3. gn-convert's cache (``~/.cache/gn_convert/ort-headers``), filled by 4;
4. a registry package that ships Microsoft's official headers: the npm package
   ``com.github.asus4.onnxruntime`` (about 150 MB; its iOS framework carries them), fetched
   once with ``npm pack`` when ``npm`` is on the PATH.

Headers work with any onnxruntime whose C API version is at least theirs
(``ORT_API_VERSION``); the version is checked before building.
"""

from __future__ import annotations

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


def cache_root() -> Path:
    """gn-convert's cache folder (``$XDG_CACHE_HOME/gn_convert``, default ``~/.cache/gn_convert``)."""
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
        staged = Path(tmp) / "headers"
        staged.mkdir()
        with tarfile.open(archives[0], "r:gz") as archive:
            for member in archive:
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and _NPM_HEADER_DIR in member.name and name.endswith(".h") \
                        and not (staged / name).exists():
                    source = archive.extractfile(member)
                    if source is not None:
                        (staged / name).write_bytes(source.read())
        if not has_headers(staged):
            raise NativeBuildError(f"npm package {NPM_PACKAGE} lacks onnxruntime's C++ headers; "
                                   f"set {ENV_VAR} to an onnxruntime include/ folder")
        if has_headers(dest):  # another process fetched them meanwhile: keep those
            return dest
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    return dest


def find_headers(include: str | Path | None = None, fetch: bool = True) -> Path:
    """Locate onnxruntime's headers (see the module docstring for the order).

    Args:
        include: a folder to use instead of the search (overrides ``GN_CONVERT_ORT_INCLUDE``).
        fetch: fetch them from the npm registry when found nowhere else.

    Returns:
        The folder holding them.

    Raises:
        NativeBuildError: a given folder lacks them, or none was found (and fetching was off or failed).
    """
    given = include if include is not None else os.environ.get(ENV_VAR)
    if given:
        folder = Path(given)
        if not has_headers(folder):
            missing = [name for name in REQUIRED if not (folder / name).is_file()]
            raise NativeBuildError(f"{folder} lacks {', '.join(missing)}; point {ENV_VAR} (or --include) at "
                                   "the include/ folder of an onnxruntime release")
        return folder
    for candidate in (*map(Path, SYSTEM_DIRS), cache_root() / "ort-headers"):
        if has_headers(candidate):
            return candidate
    if not fetch:
        raise NativeBuildError(f"onnxruntime's C++ headers were not found; set {ENV_VAR} to an onnxruntime "
                               "include/ folder, or allow fetching them from npm")
    return fetch_headers(cache_root() / "ort-headers")
