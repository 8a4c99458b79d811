"""Building the native GroupNorm kernel library, once per source, headers, flags and compiler.

gn-convert's wheel carries the library, built when the wheel is (``setup.py``):
:func:`resolve_library` returns that file (:func:`packaged_library`) before it tries any build. One
file serves every supported onnxruntime and every x86-64 CPU: it negotiates onnxruntime's C API when
it loads (the lower of the runtime's version and its headers', from API ``MIN_API_VERSION`` on) and
picks its kernels' instruction set (AVX-512, AVX2 or its baseline ``-march``) at run time
(``kernel_dispatch.h``).

Where no wheel's library is installed (an editable install, another platform), :func:`build_library`
compiles ``groupnorm_ops.cc`` with the system C++ compiler into
``~/.cache/gn_convert/native/<key>/libgn_convert_ops.so``, where the key hashes everything that
changes the binary, and returns the cached file on later calls. That build is for the machine that
built it (``-march=native`` by default): on another CPU, build it there, or choose a portable
``march`` (:data:`PORTABLE_MARCH`, which still runs AVX2 and AVX-512 kernels where the CPU has them).
A ``-march=native`` build's key includes this CPU's model and feature flags, so a cache shared between
machines (an NFS home, a container image) never hands one CPU's build to another (an AVX-512 build on
a CPU without it dies with SIGILL).

Load it with ``SessionOptions.register_custom_ops_library(path)`` (:func:`session_options`), or
in Triton with ``model_operations { op_library_filename: ... }`` (``gn-convert deploy
--native-ops``). onnxruntime then runs every ``ai.gn_convert::GroupNorm`` node of a float32
model with it instead of inlining the op's function body.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

from gn_convert.atomic import atomic_file
from gn_convert.errors import NativeBuildError
from gn_convert.native.headers import api_version, cache_root, find_headers, runtime_api_version

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("groupnorm_ops.cc")
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))
"""Our headers that SOURCE includes (part of the cache key)."""
LIBRARY_NAME = "libgn_convert_ops.so"
PACKAGED = Path(__file__).with_name(LIBRARY_NAME)
"""Where the wheel puts the library it was built with (absent in a source checkout or editable install)."""
MIN_API_VERSION = 17
"""The oldest onnxruntime C API the library runs on (``kMinApiVersion`` in ``groupnorm_ops.cc``)."""
DEFAULT_MARCH = "native"
PORTABLE_MARCH = {"x86_64": "x86-64-v2", "aarch64": "armv8-a"}.get(platform.machine(), DEFAULT_MARCH)
"""The ``-march`` of a library built to ship: on x86-64, SSE4.2 and POPCNT (every server CPU since 2009)."""
_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-fvisibility=hidden", "-Wno-psabi")
MARCH_PATTERN = re.compile(r"[A-Za-z0-9_.+-]+")
"""A ``-march`` value, matched whole: it is also compiled into the library as a string (:func:`library_target`)."""
_TARGET_MARK = re.compile(rb"gn_convert_build_target=([^\x00]{1,200})\x00")


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else ``c++``, ``g++`` or ``clang++`` from the PATH.

    Raises:
        NativeBuildError: none is installed.
    """
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return str(shutil.which(name))
    raise NativeBuildError("no C++ compiler found (set CXX, or install g++: `apt-get install g++`); "
                           "the native GroupNorm kernel needs one")


@functools.cache
def _compiler_id(cxx: str) -> str:
    """The compiler's version line (part of the cache key; asked once per process)."""
    done = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60)
    return (done.stdout.splitlines() or [cxx])[0]


def cpu_identity() -> str:
    """This CPU's model and feature flags (``/proc/cpuinfo``'s first processor; elsewhere what
    :mod:`platform` knows), for the cache key of builds that target this CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace").split("\n\n")[0]
    except OSError:
        text = ""
    wanted = ("model name", "flags", "vendor_id", "cpu family", "model", "Features", "CPU implementer", "CPU part")
    fields = [line.strip() for line in text.splitlines() if line.split(":")[0].strip() in wanted]
    return "\n".join(fields) or f"{platform.machine()} {platform.processor()}"


def build_key(flags: list[str], headers: Path, compiler_id: str) -> str:
    """The cache folder's name: a hash of the sources, onnxruntime's headers (their contents, not only
    the API number they declare), the flags, the compiler and, for ``-march=native``, :func:`cpu_identity`."""
    onnxruntime_headers = [f"{h.name}\n{h.read_text(errors='replace')}" for h in sorted(Path(headers).glob("*.h"))]
    parts = [SOURCE.read_text(), *(h.read_text() for h in HEADERS), *onnxruntime_headers, " ".join(flags),
             compiler_id]
    if any(flag in ("-march=native", "-mcpu=native", "-mtune=native") for flag in flags):
        parts.append(cpu_identity())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_library(include: str | Path | None = None, *, march: str = DEFAULT_MARCH, fetch: bool = True,
                  force: bool = False) -> Path:
    """Compile the native kernel library (or return the cached build).

    Args:
        include: onnxruntime's include folder (default: searched, see :mod:`.headers`).
        march: the ``-march`` target (``native``: this CPU).
        fetch: fetch the headers from the npm registry if they are not installed.
        force: rebuild even if a cached build exists.

    Returns:
        The path of the shared library.

    Raises:
        NativeBuildError: no compiler, no headers, headers newer than the installed onnxruntime,
            or a failed compilation (the compiler's first error line is quoted).
    """
    headers = find_headers(include, fetch=fetch)
    header_api, runtime_api = api_version(headers), runtime_api_version()
    if header_api > runtime_api:
        raise NativeBuildError(f"the headers in {headers} are for onnxruntime C API {header_api}, newer than "
                               f"the installed onnxruntime (API {runtime_api}); upgrade onnxruntime or point "
                               "GN_CONVERT_ORT_INCLUDE at older headers")
    flags = compile_flags(march)
    cxx = compiler()
    target = cache_root() / "native" / build_key(flags, headers, _compiler_id(cxx)) / LIBRARY_NAME
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling %s against onnxruntime API %d headers in %s", SOURCE.name, header_api, headers)
    start = time.perf_counter()
    with atomic_file(target) as staged:
        compile_library(headers, staged, march=march, cxx=cxx)
    log.info("built %s in %.1f s", target, time.perf_counter() - start)
    return target


def compile_flags(march: str) -> list[str]:
    """The compiler's flags for a build for ``march`` (checked: it is also compiled in as a string).

    Raises:
        NativeBuildError: ``march`` is not a compiler target name.
    """
    if not MARCH_PATTERN.fullmatch(march):
        raise NativeBuildError(f"-march {march!r} is not a compiler target name (letters, digits, '.', '_', '+', '-')")
    return [*_FLAGS, f"-march={march}", f'-DGN_CONVERT_MARCH="{march}"']


def compile_library(headers: Path, output: Path, *, march: str, cxx: str | None = None) -> None:
    """Compile ``groupnorm_ops.cc`` against the onnxruntime headers in ``headers`` into ``output``, with
    no cache and no check against an installed onnxruntime (the wheel's build has none; ``setup.py``).

    Raises:
        NativeBuildError: no compiler, or the compilation failed (its first error line is quoted).
    """
    flags = compile_flags(march)
    cxx = cxx or compiler()
    try:
        done = subprocess.run([cxx, *flags, f"-I{headers}", str(SOURCE), "-o", str(output)],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"{cxx} did not finish compiling {SOURCE.name} in 10 minutes") from None
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines()
        raise NativeBuildError(f"compiling the native GroupNorm kernel failed: {(errors or ['no output'])[0].strip()}")


def packaged_library() -> Path | None:
    """The library the installed wheel carries (:data:`PACKAGED`), or None where there is none."""
    return PACKAGED if PACKAGED.is_file() else None


def resolve_library(library: str | Path | None = None, *, portable: bool = False) -> Path:
    """The kernel library to use or ship: ``library`` when given, else the one the wheel carries, else
    a build made here.

    Args:
        library: a library built earlier (the path ``gn-convert native`` printed), to use as it is.
        portable: where a build is needed, build for :data:`PORTABLE_MARCH` instead of this CPU: a
            library shipped to a server must not use instructions its CPU may lack (the wheel's is
            portable).

    Raises:
        NativeBuildError: ``library`` does not exist, or the build fails.
    """
    if library is not None:
        path = Path(library).expanduser()
        if not path.is_file():
            raise NativeBuildError(f"native kernel library {path} not found; pass the path `gn-convert native` "
                                   "printed, or omit it to build one here")
        return path
    packaged = packaged_library()
    if packaged is not None:
        return packaged
    return build_library(march=PORTABLE_MARCH if portable else DEFAULT_MARCH)


def library_target(library: str | Path) -> str:
    """The ``-march`` a kernel library was built for (``-march=x86-64-v2``), read from the file
    without loading it; ``unknown`` for a library built before gn-convert recorded it.

    Raises:
        NativeBuildError: the file cannot be read.
    """
    try:
        data = Path(library).read_bytes()
    except OSError as err:
        raise NativeBuildError(f"cannot read the kernel library {library}: {err.strerror or err}") from err
    found = _TARGET_MARK.search(data)
    return found.group(1).decode(errors="replace") if found else "unknown"


def kernel_isa(library: str | Path) -> str:
    """The instruction set whose kernels ``library`` runs on this CPU (``avx512``, ``avx2`` or ``baseline``,
    ``$GN_CONVERT_KERNEL_ISA`` where set and this CPU runs it), read by loading it with :mod:`ctypes`;
    ``unknown`` for a library built before gn-convert chose the set at run time.

    Raises:
        NativeBuildError: the file cannot be loaded.
    """
    try:
        handle = ctypes.CDLL(str(library))
    except OSError as err:
        raise NativeBuildError(f"cannot load the kernel library {library}: {err}") from err
    if not hasattr(handle, "GnConvertKernelIsa"):
        return "unknown"
    handle.GnConvertKernelIsa.restype = ctypes.c_char_p
    return str(handle.GnConvertKernelIsa().decode())
