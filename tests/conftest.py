"""Session-scoped fixtures: models with non-trivial BatchNorm statistics (measured on real
photos that ship in a package), the small teachers, the ONNX exports every ONNX test shares,
and the native kernel library. Each is built once per test session, on first use; exports live
under pytest's session temporary folder. Callers must not modify what a fixture returns."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from torch import nn

from gn_convert.surgery import group_count
from helpers.models import DIGITS_EPOCHS, DIGITS_SIZE, Exports, Models, make_tiny_teacher

PRODUCT_MIN_CHANNELS = group_count.DEFAULT_MIN_CHANNELS
"""The library's default channels-per-group bound, read before the session fixture below replaces it."""

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one torch thread each
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def groups_as_requested() -> Iterator[None]:
    """In this process, a ``groups`` request gives every layer the G it asks for (channels-per-group bound 1),
    as the tests of kernels, exports and parity were written for (their small layers would otherwise all get
    one group). Tests marked ``product_defaults``, and every command a test runs in a child process, keep the
    library's default bound (``DEFAULT_MIN_CHANNELS``, 16)."""
    patch = pytest.MonkeyPatch()
    patch.setattr(group_count, "DEFAULT_MIN_CHANNELS", 1)
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def product_defaults(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The library's own default bound for tests marked ``product_defaults``."""
    if request.node.get_closest_marker("product_defaults") is not None:
        monkeypatch.setattr(group_count, "DEFAULT_MIN_CHANNELS", PRODUCT_MIN_CHANNELS)


@pytest.fixture(scope="session")
def nontrivial() -> Models:
    """``nontrivial(name, size=64, seed=0)``: a torchvision model (untrained weights) whose
    BatchNorm statistics were measured on photo crops; cached per session (``convert`` copies)."""
    return Models()


@pytest.fixture(scope="session")
def tiny_teacher() -> nn.Module:
    """A seeded 3-layer CNN with BatchNorm and non-trivial statistics, eval mode: for tests of
    exactness (resume, DDP, accumulation) where quality does not matter."""
    return make_tiny_teacher()


@pytest.fixture(scope="session")
def digits_teacher():
    """torchvision's ResNet-18 trained on scikit-learn's digits at 16x16 (about 98% held-out
    accuracy; tens of seconds to train: tests that use it are marked slow)."""
    from gn_convert.testing.digits import train_digits_teacher

    return train_digits_teacher(DIGITS_EPOCHS, size=DIGITS_SIZE)


@pytest.fixture(scope="session")
def exports(tmp_path_factory: pytest.TempPathFactory, nontrivial: Models) -> Exports:
    """The converted ONNX test models (``helpers.models.MODELS`` at 64x64) and their exports,
    written once per session under the session's temporary folder."""
    return Exports(tmp_path_factory.mktemp("onnx"), nontrivial)


@pytest.fixture(scope="session", autouse=True)
def native_cache_in_session_temp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """gn-convert's cache (kernel builds, headers) is a folder of this test session, shared by its xdist
    workers; nothing is built into ``~/.cache`` and nothing is fetched (``GN_CONVERT_NO_FETCH``). The
    headers are the user's, found first: ``$GN_CONVERT_ORT_INCLUDE``, the system's, or the pinned ones
    ``gn-convert native`` fetched into the user's cache (copied, and checked against their pins again)."""
    from gn_convert.errors import NativeBuildError
    from gn_convert.native.headers import CACHE_VAR, NO_FETCH_VAR, cache_root, find_headers

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each worker's
    cache = shared / "gn-convert-cache"
    try:
        headers: Path | None = find_headers(fetch=False)
    except NativeBuildError:
        headers = None
    with FileLock(str(shared / "gn-convert-cache.lock")):
        if headers is not None and headers == cache_root() / "ort-headers" and not (cache / "ort-headers").exists():
            shutil.copytree(headers, cache / "ort-headers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_VAR, str(cache))
        patch.setenv(NO_FETCH_VAR, "1")
        yield cache


@pytest.fixture(scope="session")
def native_library(native_cache_in_session_temp: Path) -> Path:
    """The native kernel library built for this CPU, in the session's cache; the tests that use it are
    skipped, with the reason, where it cannot be built (no compiler, no headers)."""
    from gn_convert.errors import NativeBuildError
    from gn_convert.native import build_library

    try:
        with FileLock(str(native_cache_in_session_temp.parent / "gn-convert-cache.lock")):  # one build for all workers
            return build_library()
    except NativeBuildError as err:
        pytest.skip(f"native kernel not available here: {err}")


@pytest.fixture
def error_line(capsys: pytest.CaptureFixture) -> Callable[[], str]:
    """The one ``gn-convert: error:`` line the CLI printed (asserts there is exactly one, no traceback)."""

    def read() -> str:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("gn-convert: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    return read
