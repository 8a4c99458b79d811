"""Builds gn-convert's native GroupNorm kernel into the wheel (everything else is in pyproject.toml).

``pip wheel .`` / ``pip install .`` compile ``gn_convert/native/groupnorm_ops.cc`` once, with the flags
and the onnxruntime headers a run-time build uses (``gn_convert.native.build``), for the portable
``-march`` (x86-64-v2 on x86-64, with AVX2 and AVX-512 kernels chosen at run time), into
``gn_convert/native/libgn_convert_ops.so``, where ``gn_convert.native.resolve_library()`` finds it
before it tries any build. The wheel is then tagged ``py3-none-<platform>``: the library calls
onnxruntime only through its C API, never Python's.

The kernel is optional. Where there is no C++ compiler or no onnxruntime headers (``$GN_CONVERT_ORT_INCLUDE``,
the system's, or the pinned ones in gn-convert's cache, which the build never downloads), the package
is built without it, as a pure wheel, with one warning, and gn-convert builds the kernel at run
time where it can (``gn-convert native``). ``GN_CONVERT_REQUIRE_NATIVE=1`` makes that a failure
instead (CI: ``.ci/run``). An editable install (``pip install -e .``) never builds it: a library
built once would go stale as the sources change, while the run-time build is keyed by their hash.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gn_convert.errors import NativeBuildError  # noqa: E402
from gn_convert.native import build as native_build  # noqa: E402
from gn_convert.native.headers import find_headers  # noqa: E402

REQUIRE_VAR = "GN_CONVERT_REQUIRE_NATIVE"
WHEEL_LIBRARY = Path("gn_convert", "native", native_build.LIBRARY_NAME)


class KernelDistribution(Distribution):
    """Says it has compiled code once the library is built, so that ``install`` puts the package in the
    platform's folder (platlib) and the wheel lays it out at its root."""

    kernel_built = False

    def has_ext_modules(self) -> bool:
        """Whether the kernel library was built into this distribution."""
        return self.kernel_built or super().has_ext_modules()


class BuildWithKernel(build_py):
    """``build_py`` that also compiles the kernel library into the build folder (not in editable mode)."""

    def run(self) -> None:
        """Copy the Python files, then compile the library beside them."""
        super().run()
        if getattr(self, "editable_mode", False):
            print("gn-convert: editable install: the native GroupNorm kernel is built at run time "
                  "(`gn-convert native`), not into the source tree", file=sys.stderr)
            return
        target = Path(self.build_lib) / WHEEL_LIBRARY
        try:
            headers = find_headers(fetch=False)
            native_build.compile_library(headers, target, march=native_build.PORTABLE_MARCH)
        except NativeBuildError as err:
            target.unlink(missing_ok=True)
            if os.environ.get(REQUIRE_VAR):
                raise SystemExit(f"gn-convert: {REQUIRE_VAR} is set and the native GroupNorm kernel was not built: "
                                 f"{err}") from err
            print(f"gn-convert: WARNING: the native GroupNorm kernel is not built into this package ({err}); "
                  "gn-convert will build it at run time where a compiler and onnxruntime's headers are available "
                  "(`gn-convert native`)", file=sys.stderr)
            return
        self.distribution.kernel_built = True
        print(f"gn-convert: built the native GroupNorm kernel ({native_build.PORTABLE_MARCH}, headers {headers}) "
              f"into {target}", file=sys.stderr)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        """The files this command wrote, the library included when it was built."""
        outputs = list(super().get_outputs(include_bytecode))
        built = Path(self.build_lib) / WHEEL_LIBRARY
        return [*outputs, str(built)] if built.is_file() else outputs


class KernelWheel(bdist_wheel):
    """A wheel tagged for its platform (any Python 3) when it carries the library, pure otherwise."""

    def run(self) -> None:
        """Build first, so that the tag and install scheme can follow what was built."""
        if not self.skip_build:
            self.run_command("build")
        self.root_is_pure = not self.distribution.has_ext_modules()
        super().run()

    def get_tag(self) -> tuple[str, str, str]:
        """``py3-none-<platform>`` for a wheel with the library (it does not use Python's C API)."""
        impl, abi, plat = super().get_tag()
        return (impl, abi, plat) if self.root_is_pure else ("py3", "none", plat)


setup(distclass=KernelDistribution, cmdclass={"build_py": BuildWithKernel, "bdist_wheel": KernelWheel})
