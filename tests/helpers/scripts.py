"""The study and benchmark scripts under ``scripts/``, loaded as modules for their tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
"""The repository's scripts folder."""


def load_script(name: str) -> ModuleType:
    """Execute ``scripts/<name>.py`` as module ``name`` (registered in ``sys.modules``: dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@contextmanager
def script_module(name: str) -> Iterator[ModuleType]:
    """:func:`load_script`, unregistered again when the block ends (for module-scoped fixtures)."""
    try:
        yield load_script(name)
    finally:
        sys.modules.pop(name, None)
