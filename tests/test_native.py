"""The native GroupNorm kernel (gn_convert.native): numbers against float64 torch, proof that
onnxruntime runs the kernel instead of the op's function body, and the build's errors.

Building needs a C++ compiler and onnxruntime's headers (the user's: the tests build in their session's
cache and never fetch, see ``tests/conftest.py``); where either is missing, the kernel tests are skipped
with the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gn_convert.errors import NativeBuildError
from gn_convert.native import PORTABLE_MARCH, build_library, find_headers, resolve_library
from gn_convert.native import build as native_build
from gn_convert.native import headers as native_headers
from gn_convert.onnx.op import DOMAIN
from gn_convert.runtime import session_options
from helpers.onnx_cases import FP16_BOUND, FP32_BOUND, SHAPES_GROUPS, inputs, one_node_model, reference, shape_id


@pytest.fixture
def library(native_library: Path) -> Path:
    return native_library


@pytest.fixture(scope="module")
def portable_library(native_library: Path) -> Path:
    """The build for PORTABLE_MARCH, which deploy ships when no library is given."""
    return build_library(march=PORTABLE_MARCH)


def _session(model: onnx.ModelProto | str, library: Path | None, optimized: Path | None = None) -> ort.InferenceSession:
    options = session_options(library=library) if library is not None else ort.SessionOptions()
    options.intra_op_num_threads = 2
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _custom_nodes_after_optimisation(model: onnx.ModelProto | str, library: Path | None, tmp_path: Path) -> int:
    """How many ai.gn_convert nodes onnxruntime kept: kept nodes ran on a kernel, not the body."""
    optimized = tmp_path / f"optimized-{library is not None}.onnx"
    _session(model, library, optimized)
    graph = onnx.load(str(optimized), load_external_data=False).graph
    return sum(node.domain == DOMAIN for node in graph.node)


NATIVE_MEAN1000_BOUND = 1e-4
"""The kernel sums in double across chunks: 1.6e-5 measured at mean 1000 (the function body 5.5e-5)."""


@pytest.mark.parametrize("shape,groups", SHAPES_GROUPS,
                         ids=shape_id)
@pytest.mark.parametrize("mean,bound", [(0.0, FP32_BOUND), (1000.0, NATIVE_MEAN1000_BOUND)], ids=["mean0", "mean1000"])
def test_kernel_matches_float64_torch(library: Path, shape: tuple[int, ...], groups: int, mean: float,
                                      bound: float) -> None:
    model = one_node_model(shape, groups, 1e-5, onnx.TensorProto.FLOAT)
    feeds = inputs(shape, mean, np.float32)
    got = _session(model, library).run(None, feeds)[0].astype(np.float64)
    ref = reference(feeds, groups, 1e-5)
    assert np.abs(got - ref).max() / np.abs(ref).max() < bound


def test_kernel_replaces_the_function_body(library: Path, tmp_path: Path) -> None:
    model = one_node_model((2, 8, 5, 7), 4, 1e-5, onnx.TensorProto.FLOAT)
    assert _custom_nodes_after_optimisation(model, None, tmp_path) == 0  # inlined without the library
    assert _custom_nodes_after_optimisation(model, library, tmp_path) == 1


@pytest.mark.parametrize("eps", [None, 0.5], ids=["default", "0.5"])
def test_epsilon_attribute_and_default(library: Path, eps: float | None) -> None:
    shape = (2, 6, 4, 4)
    feeds = inputs(shape, 0.0, np.float32)
    feeds["X"] *= 1e-3  # variance ~1e-6: epsilon dominates, so a wrong epsilon shows
    got = _session(one_node_model(shape, 3, eps, onnx.TensorProto.FLOAT), library).run(None, feeds)[0]
    ref = reference(feeds, 3, 1e-5 if eps is None else eps)
    assert np.abs(got - ref).max() / np.abs(ref).max() < FP32_BOUND


def test_float16_model_computes_in_float32(library: Path) -> None:
    shape, groups = (2, 8, 6, 6), 2
    feeds = inputs(shape, 1000.0, np.float16)
    got = _session(one_node_model(shape, groups, 1e-5, onnx.TensorProto.FLOAT16), library).run(None, feeds)[0]
    ref = reference(feeds, groups, 1e-5)
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max() < FP16_BOUND


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_exported_model_agrees_with_its_function_body(library: Path, name: str, tmp_path: Path, exports) -> None:
    report = exports.exported(name)
    x = exports.crops(4).numpy()
    native = _session(str(report.path), library).run(None, {"input": x})[0]
    body = _session(str(report.path), None).run(None, {"input": x})[0]
    assert np.abs(native - body).max() / np.abs(body).max() < 1e-5
    assert (native.argmax(1) == body.argmax(1)).all()
    assert _custom_nodes_after_optimisation(str(report.path), library, tmp_path) == len(report.layers)


def test_the_tests_build_the_kernel_in_their_session_cache_not_the_users(library: Path,
                                                                        native_cache_in_session_temp: Path) -> None:
    """Defect: the fixture built into the real ~/.cache (and could fetch 150 MB of headers there)."""
    assert native_cache_in_session_temp in library.parents
    assert Path.home() / ".cache" not in library.parents
    assert os.environ[native_headers.NO_FETCH_VAR] == "1"
    assert native_headers.cache_root() == native_cache_in_session_temp


def test_cached_build_is_reused_and_force_rebuilds(library: Path) -> None:
    before = library.stat().st_mtime_ns
    assert build_library() == library and library.stat().st_mtime_ns == before
    assert build_library(force=True) == library and library.stat().st_mtime_ns != before


def test_folder_without_headers_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NativeBuildError, match="lacks onnxruntime_c_api.h.*include/ folder"):
        find_headers(tmp_path)


def test_headers_newer_than_the_runtime_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in native_headers.REQUIRED:
        (tmp_path / name).write_text("#define ORT_API_VERSION 99\n" if name == "onnxruntime_c_api.h" else "")
    with pytest.raises(NativeBuildError, match="C API 99, newer than the installed onnxruntime"):
        build_library(tmp_path)


def test_missing_compiler_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(native_build.shutil, "which", lambda name: None)
    with pytest.raises(NativeBuildError, match="no C.. compiler found"):
        native_build.compiler()


def test_no_headers_and_no_fetching_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(native_headers.ENV_VAR, raising=False)
    monkeypatch.delenv(native_headers.CACHE_VAR, raising=False)  # the session's cache: this test's own instead
    monkeypatch.delenv(native_headers.NO_FETCH_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(native_headers, "SYSTEM_DIRS", ())
    with pytest.raises(NativeBuildError, match="headers were not found; set GN_CONVERT_ORT_INCLUDE"):
        find_headers(fetch=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm either
    with pytest.raises(NativeBuildError, match="npm is not there"):
        find_headers()
    assert not any(Path(tmp_path).rglob("*.h")) and os.listdir(tmp_path) in ([], ["gn_convert"])


def test_parity_on_the_native_provider_passes_and_localises_a_corrupt_layer(library: Path, tmp_path: Path, exports) -> None:
    from gn_convert.parity import check_parity
    from helpers.parity import corrupt_scale

    report = check_parity(exports.converted("resnet18"), exports.exported("resnet18").path, providers="cpu,cpu-native",
                          batch=4, native_library=library)
    native_rows = [r for r in report.rows if r.provider == "cpu-native"]
    assert report.passed and len(native_rows) == len(report.rows) * 3 // 5, report.table()  # off, all, blocked
    assert {r.level for r in native_rows} == {"off", "all", "blocked"}
    assert max(r.metrics.max_rel for r in native_rows if r.inputs == "random") < 1e-4
    bad = tmp_path / "corrupt.onnx"
    corrupt_scale(exports.exported("resnet18").path, exports.exported("resnet18").path, "layer2.0.bn1", bad)
    report = check_parity(exports.converted("resnet18"), bad, providers="cpu-native", levels=("all",), batch=4,
                          native_library=library)
    assert not report.passed and "layer2.0.bn1" in report.table()


def test_native_provider_reports_why_it_is_unavailable(monkeypatch: pytest.MonkeyPatch, exports, tmp_path: Path) -> None:
    from gn_convert.parity import check_parity

    def refuse(*args: object, **kwargs: object) -> Path:
        raise NativeBuildError("no C++ compiler found")
    monkeypatch.setattr(native_build, "PACKAGED", tmp_path / "no-wheel" / native_build.LIBRARY_NAME)
    monkeypatch.setattr(native_build, "build_library", refuse)
    report = check_parity(exports.converted("resnet18"), exports.exported("resnet18").path, providers="cpu-native",
                          levels=("all",))
    assert report.skipped == {"cpu-native": "no C++ compiler found"}


def test_triton_repo_ships_the_portable_library_and_loads_it_by_model_operations(
        library: Path, portable_library: Path, tmp_path: Path, exports) -> None:
    """Defect: deploy --native-ops shipped a build for this machine's CPU (-march=native), which
    a server's CPU may not run; without --native-library it ships the PORTABLE_MARCH build."""
    pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed")
    from gn_convert.cli import main
    from helpers.triton import parsed

    assert portable_library != library and PORTABLE_MARCH != "native"
    assert main(["deploy", str(exports.exported("resnet18").path), "--triton-repo", str(tmp_path), "--name", "r18",
                 "--native-ops", "--server-repo", "/srv/models"]) == 0
    config = parsed(tmp_path / "r18")
    assert list(config.model_operations.op_library_filename) == ["/srv/models/r18/libgn_convert_ops.so"]
    assert (tmp_path / "r18" / library.name).read_bytes() == portable_library.read_bytes()
    assert portable_library.read_bytes() != library.read_bytes()
    options = session_options(library=tmp_path / "r18" / library.name)  # the shipped copy loads and runs the op
    session = ort.InferenceSession(str(tmp_path / "r18" / "1" / "model.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    x = exports.crops(2).numpy()
    body = _session(str(exports.exported("resnet18").path), None).run(None, {"input": x})[0]
    assert np.abs(session.run(None, {"input": x})[0] - body).max() / np.abs(body).max() < 1e-5


@pytest.mark.slow
def test_local_triton_server_runs_the_native_kernel(library: Path, exports) -> None:
    pytest.importorskip("pytriton", reason="the serve extra is not installed")
    from gn_convert.deploy.server import TritonModelServer
    from helpers.triton import STARTUP_TIMEOUT_S, client, infer

    path = exports.exported("resnet18").path
    server = TritonModelServer(path, name="resnet18", http_port=0, native_ops=library,
                               startup_timeout_s=STARTUP_TIMEOUT_S)
    x = exports.crops(3).numpy()
    body = _session(str(path), None).run(None, {"input": x})[0]
    try:
        server.start()
        with client(server, "http") as c:
            served = infer(c, "http", x)
    finally:
        server.close()
    assert np.abs(served - body).max() / np.abs(body).max() < 1e-5


def test_cli_native_prints_the_library_and_refuses_a_bad_include(library: Path, tmp_path: Path, capsys) -> None:
    from gn_convert.cli import main

    assert main(["native"]) == 0
    assert capsys.readouterr().out.strip() == str(library)
    assert main(["native", "--include", str(tmp_path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("building the native GroupNorm kernel")  # said before building
    assert err[1].startswith("gn-convert: error:") and "lacks onnxruntime_c_api.h" in err[1]


def test_cli_bench_times_the_native_kernel_beside_the_model(library: Path, capsys, exports) -> None:
    from gn_convert.cli import main

    path = exports.exported("resnet18").path
    assert main(["bench", str(path), "--native", "--batch", "1", "--rounds", "2", "--warmup", "1",
                 "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(k for k, line in enumerate(lines) if line.startswith("variant"))
    assert [line.split()[0] for line in lines[head + 2:head + 4]] == ["model", "native"]
    assert main(["bench", str(path), "--native", "--provider", "cuda"]) == 2
    assert "--native is a CPU kernel" in capsys.readouterr().err


def test_native_ops_are_refused_where_they_would_not_run(library: Path, tmp_path: Path, exports) -> None:
    pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed")
    from gn_convert.deploy import DeployError, write_triton_repo

    for kwargs in ({"inlined": True}, {"instance": "gpu"}):
        with pytest.raises(DeployError, match="runs the custom op on CPU instances"):
            write_triton_repo(exports.exported("resnet18").path, tmp_path, native_ops=library, **kwargs)
    with pytest.raises(DeployError, match="not found; build it"):
        write_triton_repo(exports.exported("resnet18").path, tmp_path, native_ops=tmp_path / "none.so")
    assert not any(tmp_path.iterdir())


def test_main_command_checks_and_ships_the_native_kernel(library: Path, portable_library: Path, tmp_path: Path,
                                                         capsys) -> None:
    pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed")
    import json

    from gn_convert.cli import main

    out, repo = tmp_path / "gn-r18", tmp_path / "repo"
    assert main(["resnet18", "--weights", "none", "--native", "--triton-repo", str(repo), "--parity-batch", "2",
                 "--out", str(out)]) == 0
    assert "parity passed on cpu, cpu-native (30 comparisons" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert {row["provider"] for row in report["parity"]["rows"]} == {"cpu", "cpu-native"}
    # the library checked by parity is the one shipped: the portable build, as it goes to a server
    assert report["triton"]["native_ops"] == str(portable_library)
    assert (repo / "gn-r18" / library.name).read_bytes() == portable_library.read_bytes()
    given = tmp_path / "given" / library.name
    given.parent.mkdir()
    given.write_bytes(library.read_bytes())
    assert main(["resnet18", "--weights", "none", "--native", "--native-library", str(given), "--triton-repo",
                 str(repo), "--triton-name", "given", "--parity-batch", "2", "--no-parity", "--out",
                 str(tmp_path / "gn-given")]) == 0
    assert (repo / "given" / library.name).read_bytes() == library.read_bytes()
    assert main(["resnet18", "--weights", "none", "--native", "--no-onnx", "--out", str(tmp_path / "x")]) == 2
    assert "drop --no-onnx" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["resnet18", "--weights", "none", "--native", "--onnx-target", "fast", "--out", str(tmp_path / "x")]) == 2
    assert "the fast target has none" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_library_onnxruntime_refuses_is_one_clear_error(tmp_path: Path, exports) -> None:
    from gn_convert.bench.variants import ort_session
    from gn_convert.errors import NativeBuildError

    bogus = tmp_path / "libbogus.so"
    bogus.write_bytes(b"not a shared library")
    with pytest.raises(NativeBuildError, match="onnxruntime cannot load .*libbogus.so.*gn-convert native --force"):
        ort_session(exports.exported("resnet18").path, threads=1, custom_ops_library=bogus)


def test_deploy_ships_the_library_given(library: Path, tmp_path: Path, exports) -> None:
    pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed")
    from gn_convert.cli import main

    given = tmp_path / "mine" / "libgn_convert_ops.so"
    given.parent.mkdir()
    given.write_bytes(library.read_bytes() + b"\0")  # distinguishable from any build, still loadable
    assert main(["deploy", str(exports.exported("resnet18").path), "--triton-repo", str(tmp_path / "repo"),
                 "--name", "r18", "--native-ops", "--native-library", str(given)]) == 0
    assert (tmp_path / "repo" / "r18" / given.name).read_bytes() == given.read_bytes()
    assert main(["deploy", str(exports.exported("resnet18").path), "--triton-repo", str(tmp_path / "repo"),
                 "--name", "r2", "--native-library", str(given)]) == 2  # a library to ship needs --native-ops


def test_resolve_library_uses_the_path_given_then_the_wheels_then_a_build(tmp_path: Path, monkeypatch) -> None:
    given = tmp_path / "lib.so"
    given.write_bytes(b"x")
    assert resolve_library(given) == given
    with pytest.raises(NativeBuildError, match="not found"):
        resolve_library(tmp_path / "none.so")
    marches: list[str] = []
    monkeypatch.setattr(native_build, "build_library", lambda **kw: marches.append(kw["march"]) or given)
    monkeypatch.setattr(native_build, "PACKAGED", tmp_path / "wheel" / native_build.LIBRARY_NAME)
    resolve_library(portable=True)
    resolve_library()
    assert marches == [PORTABLE_MARCH, "native"]  # no wheel's library: a build, portable where it ships
    native_build.PACKAGED.parent.mkdir()
    native_build.PACKAGED.write_bytes(b"the wheel's")
    assert resolve_library() == resolve_library(portable=True) == native_build.PACKAGED  # before any build
    assert resolve_library(given) == given and marches == [PORTABLE_MARCH, "native"]


def test_bench_and_serve_take_the_native_library_given(tmp_path: Path, capsys, exports) -> None:
    """--native-library PATH is the library bench times and serve loads: a missing one is one
    line and exit 2 (nothing is built in its place)."""
    from gn_convert.cli import main

    missing = tmp_path / "none" / "libgn_convert_ops.so"
    path = str(exports.exported("resnet18").path)
    assert main(["bench", path, "--native", "--native-library", str(missing), "--batch", "1", "--rounds", "1"]) == 2
    assert f"native kernel library {missing} not found" in capsys.readouterr().err
    assert main(["serve", path, "--native", "--native-library", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"native kernel library {missing} not found" in err[0]


def test_a_tampered_header_archive_is_refused_and_nothing_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake ``npm`` that packs the right file names with other bytes: the pinned SHA-512 refuses it."""
    import tarfile

    staging = tmp_path / "pkg" / "package" / "Headers"
    staging.mkdir(parents=True)
    for name in native_headers.REQUIRED:
        (staging / name).write_text("#define ORT_API_VERSION 29\n")
    archive = tmp_path / "fake.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "pkg" / "package", arcname="package")
    fake_npm = tmp_path / "bin" / "npm"
    fake_npm.parent.mkdir()
    fake_npm.write_text(f'#!/bin/sh\nwhile [ "$1" != "--pack-destination" ]; do shift; done\ncp {archive} "$2"/x.tgz\n')
    fake_npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_npm.parent}:{os.environ['PATH']}")
    monkeypatch.delenv(native_headers.ENV_VAR, raising=False)
    monkeypatch.delenv(native_headers.CACHE_VAR, raising=False)  # the session's cache: this test's own instead
    monkeypatch.delenv(native_headers.NO_FETCH_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(native_headers, "SYSTEM_DIRS", ())
    with pytest.raises(NativeBuildError, match="does not match its pinned SHA-512"):
        find_headers()
    assert not (tmp_path / "cache" / "gn_convert" / "ort-headers").exists()


def test_every_onnxruntime_header_the_build_includes_is_pinned(library: Path) -> None:
    """Defect: onnxruntime_c_api.h includes onnxruntime_ep_c_api.h, which was compiled in unchecked."""
    real = find_headers(fetch=False)
    if native_headers.mismatched_headers(real):
        pytest.skip(f"headers come from {real}, not the pinned set")
    done = native_build.subprocess.run([native_build.compiler(), "-std=c++17", "-MM", f"-I{real}",
                                        str(native_build.SOURCE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    included = {Path(word).name for word in done.stdout.replace("\\\n", " ").split()
                if Path(word).parent == real}
    assert included == set(native_headers.HEADER_SHA256), included ^ set(native_headers.HEADER_SHA256)
    assert sorted(p.name for p in real.glob("*.h")) == sorted(native_headers.HEADER_SHA256)  # and no other


def test_the_header_cache_keeps_only_the_pinned_headers(library: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    real = find_headers(fetch=False)
    if native_headers.mismatched_headers(real):
        pytest.skip(f"headers come from {real}, not the pinned set")
    monkeypatch.delenv(native_headers.ENV_VAR, raising=False)
    monkeypatch.setenv(native_headers.CACHE_VAR, str(tmp_path))
    monkeypatch.setattr(native_headers, "SYSTEM_DIRS", ())
    shutil.copytree(real, tmp_path / "ort-headers")
    (tmp_path / "ort-headers" / "coreml_provider_factory.h").write_text("// not pinned\n")
    assert find_headers(fetch=False) == tmp_path / "ort-headers"
    assert not (tmp_path / "ort-headers" / "coreml_provider_factory.h").exists()


def test_a_linked_header_cache_is_read_and_never_pruned(library: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect: with ``ort-headers`` a link to a user's onnxruntime include/ folder, the cache's pruning deleted
    the user's other headers."""
    import shutil

    real = find_headers(fetch=False)
    if native_headers.mismatched_headers(real):
        pytest.skip(f"headers come from {real}, not the pinned set")
    monkeypatch.delenv(native_headers.ENV_VAR, raising=False)
    monkeypatch.setenv(native_headers.CACHE_VAR, str(tmp_path / "cache"))
    monkeypatch.setattr(native_headers, "SYSTEM_DIRS", ())
    include = tmp_path / "onnxruntime" / "include"
    shutil.copytree(real, include)
    (include / "coreml_provider_factory.h").write_text("// the user's\n")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "ort-headers").symlink_to(include, target_is_directory=True)
    assert find_headers(fetch=False) == tmp_path / "cache" / "ort-headers"
    assert (include / "coreml_provider_factory.h").read_text() == "// the user's\n"


def test_the_onnxruntime_floor_serves_the_pinned_headers_api() -> None:
    """Defect: the headers were API 29 while onnxruntime>=1.20 was declared (a build for 1.20 refused)."""
    import re

    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    floor = int(re.search(r'^\s*"onnxruntime>=1\.(\d+)', text, re.M).group(1))
    assert floor >= native_headers.PINNED_API and floor >= 30  # 1.30: the first precise LayerNormalization
    assert native_headers.runtime_api_version() >= floor
    assert not re.search(r"^gpu\s*=", text, re.M)  # the extra installed onnxruntime-gpu over onnxruntime


def test_cached_headers_are_checked_against_their_pins(library: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    monkeypatch.delenv(native_headers.ENV_VAR, raising=False)
    real = find_headers(fetch=False)
    if real != native_headers.cache_root() / "ort-headers":
        pytest.skip(f"headers come from {real}, not gn-convert's cache")
    assert native_headers.mismatched_headers(real) == []
    monkeypatch.delenv(native_headers.CACHE_VAR, raising=False)  # the session's cache: this test's own instead
    monkeypatch.delenv(native_headers.NO_FETCH_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = native_headers.cache_root() / "ort-headers"
    shutil.copytree(real, cached)
    assert find_headers(fetch=False) == cached
    with open(cached / "onnxruntime_cxx_inline.h", "a") as stream:
        stream.write("\n// changed\n")
    with pytest.raises(NativeBuildError, match=r"differ from the pinned ones \(onnxruntime_cxx_inline.h\)"):
        find_headers(fetch=False)


def test_deploy_checks_the_session_the_server_runs(library: Path, tmp_path: Path, exports,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Parity checked the blocked rewrite while Triton runs the plain kernel under onnxruntime's
    optimisations: the deploy check opens that configuration, in a child process."""
    pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed")
    from gn_convert.deploy import DeployError, served_check, write_triton_repo
    from gn_convert.runtime import open_session

    path = exports.exported("resnet18").path
    assert served_check.check_served(path, library) < 1e-4
    opened = []
    real = open_session
    monkeypatch.setattr("gn_convert.runtime.open_session", lambda *a, **k: opened.append(k) or real(*a, **k))
    served_check._main(str(path), str(library))
    assert opened[1] == {"level": "all", "library": str(library), "blocked": False}  # the server's session
    with pytest.raises(DeployError, match=r"not a shared library|cannot load"):
        bogus = tmp_path / "libbogus.so"
        bogus.write_bytes(b"not a shared library")
        served_check.check_served(path, bogus)
    monkeypatch.setattr("gn_convert.deploy.triton_repo.check_served",
                        lambda *_: (_ for _ in ()).throw(DeployError("the native kernel as the server runs it "
                                                                     "changed the model's output")))
    with pytest.raises(DeployError, match="as the server runs it changed"):
        write_triton_repo(path, tmp_path / "repo", name="r18", native_ops=library)
    assert not (tmp_path / "repo" / "r18").exists()


def test_a_library_that_kills_the_process_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gn_convert.deploy import DeployError, served_check

    class Killed:
        returncode, stdout, stderr = -4, "", ""

    monkeypatch.setattr(served_check.subprocess, "run", lambda *a, **k: Killed())
    with pytest.raises(DeployError, match=r"crashed onnxruntime on this machine \(SIGILL: built for another CPU\?\)"):
        served_check.check_served(tmp_path / "m.onnx", tmp_path / "lib.so")


def test_native_builds_are_cached_per_cpu_and_portable_ones_are_shared(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """Defect: the key held the text -march=native but not the CPU: a shared cache handed an
    AVX-512 build to a CPU without it (SIGILL)."""
    headers = tmp_path / "include"
    headers.mkdir()
    (headers / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 29\n")
    native_flags, portable_flags = ["-O3", "-march=native"], ["-O3", f"-march={PORTABLE_MARCH}"]
    here = native_build.build_key(native_flags, headers, "g++ 12")
    assert "flags" in native_build.cpu_identity()  # this Linux x86 machine: model name and feature flags
    monkeypatch.setattr(native_build, "cpu_identity", lambda: "model name : Another CPU\nflags : sse2 avx512f")
    assert native_build.build_key(native_flags, headers, "g++ 12") != here
    portable = native_build.build_key(portable_flags, headers, "g++ 12")
    monkeypatch.setattr(native_build, "cpu_identity", lambda: "model name : A third CPU\nflags : sse2")
    assert native_build.build_key(portable_flags, headers, "g++ 12") == portable


def test_the_build_key_hashes_the_headers_contents_not_only_their_api_number(tmp_path: Path) -> None:
    """Defect: two header sets that declare the same API number (a patched or mismatched copy) shared a build."""
    headers = tmp_path / "include"
    headers.mkdir()
    (headers / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 29\nstruct OrtApi { int a; };\n")
    before = native_build.build_key(["-O3"], headers, "g++ 12")
    (headers / "onnxruntime_c_api.h").write_text("#define ORT_API_VERSION 29\nstruct OrtApi { long a; };\n")
    assert native_build.build_key(["-O3"], headers, "g++ 12") != before


def test_the_library_records_the_march_it_was_built_for(library: Path, portable_library: Path, tmp_path: Path) -> None:
    """Read from the file without loading it: what a blocked model's metadata and Triton config record."""
    assert native_build.library_target(library) == "-march=native"
    assert native_build.library_target(portable_library) == f"-march={PORTABLE_MARCH}"
    older = tmp_path / "libolder.so"
    older.write_bytes(b"\x7fELF built before gn-convert recorded its target")
    assert native_build.library_target(older) == "unknown"
    with pytest.raises(NativeBuildError, match="is not a compiler target name"):
        build_library(march='native"; echo')
