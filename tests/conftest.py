"""Session-scoped fixtures: models with non-trivial BatchNorm statistics (measured on real
photos that ship in a package), the small teachers, the ONNX exports every ONNX test shares,
and the native kernel library. Each is built once per test session, on first use; exports live
under pytest's session temporary folder. Callers must not modify what a fixture returns."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from helpers.models import DIGITS_EPOCHS, DIGITS_SIZE, Exports, Models, make_tiny_teacher

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N workers share the cores, one torch thread each
    torch.set_num_threads(1)


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


@pytest.fixture(scope="session")
def native_library() -> Path:
    """The native kernel library built for this CPU; the test is skipped where it cannot build."""
    from gn_convert.errors import NativeBuildError
    from gn_convert.native import build_library

    try:
        return build_library()
    except NativeBuildError as err:
        pytest.skip(f"native kernel not buildable here: {err}")


@pytest.fixture
def error_line(capsys: pytest.CaptureFixture) -> Callable[[], str]:
    """The one ``gn-convert: error:`` line the CLI printed (asserts there is exactly one, no traceback)."""

    def read() -> str:
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("gn-convert: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        return lines[0]

    return read
