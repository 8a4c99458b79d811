"""The kernel in the wheel: a wheel built from this checkout carries the native GroupNorm library, and a
fresh environment that installs it with pip, whose PATH has no compiler (nor npm) and whose cache has
no onnxruntime headers, gets that library from ``resolve_library()`` without any build, checks parity on
it and ships the same file to Triton.

``.ci/run`` builds the wheel once and names it in ``$GN_CONVERT_WHEEL``; without it the test builds one
(``pip wheel`` of a copy of the sources, about 10 s), skipped with the reason where there is no compiler
or no headers. The fresh environment reuses this one's packages through a ``.pth`` line (as ``.ci/run``'s
timm-floor environment does), so only gn-convert itself comes from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from gn_convert.errors import NativeBuildError
from gn_convert.native.build import LIBRARY_NAME, compiler
from gn_convert.native.headers import find_headers

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
WHEEL_VAR = "GN_CONVERT_WHEEL"
LIBRARY_IN_WHEEL = f"gn_convert/native/{LIBRARY_NAME}"
PROBE = """
import json, gn_convert
from gn_convert.native.build import kernel_isa, library_target, packaged_library, resolve_library
lib = resolve_library()
print(json.dumps({"package": gn_convert.__file__, "library": str(lib), "packaged": str(packaged_library()),
                  "isa": kernel_isa(lib), "target": library_target(lib)}))
"""


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{cmd[:4]} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory, native_cache_in_session_temp: Path) -> Path:
    """The wheel ``.ci/run`` built, or one built here from a copy of the sources (with the kernel required)."""
    if os.environ.get(WHEEL_VAR):
        given = Path(os.environ[WHEEL_VAR])
        assert given.is_file(), f"${WHEEL_VAR} names {given}, which does not exist"
        return given
    try:
        compiler()
        find_headers(fetch=False)
    except NativeBuildError as err:
        pytest.skip(f"cannot build the wheel's kernel here: {err}")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "gn_convert", source / "gn_convert", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(work / "dist"),
          str(source)], env={**os.environ, "GN_CONVERT_REQUIRE_NATIVE": "1"})
    (built,) = (work / "dist").glob("gn_convert-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_env(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A new virtual environment with the wheel installed by pip, and the environment variables of a
    machine without a compiler or headers: (its bin folder, env)."""
    work = tmp_path_factory.mktemp("fresh")
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    main_site = sysconfig.get_paths()["purelib"]
    Path(site, "zz_gn_convert_main_env.pth").write_text(f"import site; site.addsitedir({main_site!r})\n")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    (work / "cache").mkdir()
    (work / "home").mkdir()
    drop = {"GN_CONVERT_ORT_INCLUDE", "GN_CONVERT_NO_FETCH", "CXX", "CC", "XDG_CACHE_HOME", "PYTHONPATH",
            "VIRTUAL_ENV", "PYTEST_XDIST_WORKER", "PYTEST_CURRENT_TEST"}
    env = {key: value for key, value in os.environ.items() if key not in drop}
    env.update(PATH=str(venv / "bin"), GN_CONVERT_CACHE=str(work / "cache"), HOME=str(work / "home"),
               OMP_NUM_THREADS="1")
    return venv / "bin", env


def test_the_wheel_carries_the_portable_kernel_library(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        library = archive.read(LIBRARY_IN_WHEEL)
        tag = archive.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    assert "Tag: py3-none-linux_" in tag and "Root-Is-Purelib: false" in tag  # any Python 3, this platform
    assert b"gn_convert_build_target=-march=x86-64-v2\x00" in library  # portable baseline, AVX2/AVX-512 dispatched
    assert "gn_convert/native/THIRD_PARTY_NOTICES.txt" in names  # onnxruntime's headers' MIT notice


def test_a_fresh_environment_without_a_compiler_gets_the_kernel_from_the_wheel_and_passes_parity(
        fresh_env: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = fresh_env
    assert shutil.which("c++", path=env["PATH"]) is None and shutil.which("g++", path=env["PATH"]) is None
    assert shutil.which("npm", path=env["PATH"]) is None
    probe = json.loads(_run([str(bin_dir / "python"), "-c", PROBE], env=env, cwd=tmp_path).stdout)
    venv = bin_dir.parent
    assert Path(probe["package"]).is_relative_to(venv), probe  # the installed wheel, not this checkout
    assert probe["library"] == probe["packaged"] and Path(probe["library"]).is_relative_to(venv), probe
    assert probe["target"] == "-march=x86-64-v2" and probe["isa"] in ("avx512", "avx2", "baseline"), probe

    out, repo = tmp_path / "gn-r18", tmp_path / "repo"
    done = _run([str(bin_dir / "gn-convert"), "resnet18", "--weights", "none", "--native", "--parity-batch", "2",
                 "--triton-repo", str(repo), "--out", str(out)], env=env, cwd=tmp_path)
    assert "parity passed on cpu, cpu-native" in done.stderr, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    native_rows = [row for row in report["parity"]["rows"] if row["provider"] == "cpu-native"]
    assert native_rows and report["parity"]["passed"], report["parity"]
    assert report["triton"]["native_ops"] == probe["library"]  # checked on and shipped: the wheel's library
    assert (repo / "gn-r18" / LIBRARY_NAME).read_bytes() == Path(probe["library"]).read_bytes()
    assert not (Path(env["GN_CONVERT_CACHE"]) / "native").exists()  # nothing was built
    assert not (Path(env["GN_CONVERT_CACHE"]) / "ort-headers").exists()  # nor fetched
