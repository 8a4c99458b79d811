"""The package stays easy to live in: no module-level import cycle, no module over 400 lines,
and dead code stays removed. Imports are read with ``ast`` (as /work/shared/tools/house_check.py
does), so nothing is imported to check them."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gn_convert"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of the package that ``path`` imports at module level (not inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = [f"{module}.{alias.name}" for alias in node.names]
            targets = [t for t in subs if t in known]  # `from . import sub` imports the submodule
            if len(targets) < len(subs):
                targets.append(module)  # names taken from the module itself
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_import_graph_reader_sees_a_cycle() -> None:
    """The checker itself: a two-module cycle and a self-import."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_level_import_cycle() -> None:
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(path, name, known) for name, path in modules.items()}
    assert len(graph) > 50 and graph["gn_convert.pipeline"]  # the reader found the package and its imports
    assert _cycles(graph) == []


def test_no_module_over_400_lines() -> None:
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_dead_code_stays_removed() -> None:
    """fidelity.distributed.unwrap and Traced.opset had no caller left (STYLE: no dead code)."""
    from gn_convert.fidelity import distributed
    from gn_convert.onnx.trace import Traced

    assert not hasattr(distributed, "unwrap")
    assert "opset" not in {f.name for f in dataclasses.fields(Traced)}


@pytest.mark.parametrize("module", ["gn_convert.onnx.errors", "gn_convert.parity.errors", "gn_convert.deploy.errors",
                                    "gn_convert.native.errors", "gn_convert.onnx.staging", "gn_convert.cli.stages"])
def test_merged_modules_are_gone(module: str) -> None:
    """One error hierarchy (gn_convert.errors), one atomic-output module, one Stages."""
    name = module.removeprefix("gn_convert.").replace(".", "/")
    assert not (PACKAGE / f"{name}.py").exists()


def test_bad_input_errors_are_value_errors_and_environment_problems_are_not() -> None:
    from gn_convert import errors

    for name in ("UnknownModelError", "WeightsError", "GroupPlanError", "DataError", "ModelMismatchError",
                 "OptionError", "OnnxFileError", "ParityError", "DeployError", "BenchError", "SessionError",
                 "OutputError", "CheckpointError"):
        assert issubclass(getattr(errors, name), errors.InputError) and issubclass(getattr(errors, name), ValueError), name
    for name in ("NativeBuildError", "ServerError", "ServeExtraMissingError", "ProviderUnavailableError"):
        cls = getattr(errors, name)
        assert issubclass(cls, errors.EnvironmentProblem) and not issubclass(cls, ValueError), name
    assert errors.first_line(RuntimeError("first\nsecond")) == "first"
    assert errors.first_line(RuntimeError("")) == "RuntimeError"
