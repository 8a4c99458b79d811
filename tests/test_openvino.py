"""OpenVINO as a deployment target: the ``openvino`` export target, the files offered to OpenVINO users in
both shape modes, the ``openvino`` / ``openvino-default`` parity providers, and the static-batch crash.

The lowering's structure and precision run under onnxruntime everywhere; the rest needs the openvino
package (the ``openvino`` extra) and is skipped with the reason where it is absent. Every OpenVINO compile
here is first tried in a child process (``OpenVinoSession(probe=True)``), so an OpenVINO crash fails a
test instead of killing pytest.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from gn_convert.errors import ProviderUnavailableError, SessionError
from gn_convert.onnx.lowering.channel_stats import OUTPUT_SUFFIX, to_channel_stats
from gn_convert.onnx.op import DOMAIN
from gn_convert.onnx.reading import read_model
from gn_convert.onnx.targets import OPENVINO_TARGETS, TARGETS
from gn_convert.onnx.verify import check_counts
from gn_convert.parity import check_parity
from helpers.models import MODELS
from helpers.onnx_cases import (
    FP32_BOUND,
    FP32_MEAN1000_BOUND,
    LEVELS,
    SHAPES_GROUPS,
    inputs,
    one_node_model,
    reference,
    relative_error,
    shape_id,
)
from helpers.scripts import SCRIPTS, load_script

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed: pip install "
                                    "'gn-convert[openvino]' (the OpenVINO tests are skipped)")
TORCH_BOUND = 1e-4
"""Max abs error against torch on photo crops, the bound of every float32 CPU target (measured 2e-6 to 5e-6)."""
EPS = 1e-5


def _session(path: Path | bytes, mode: str, provider: str = "openvino"):
    from gn_convert.runtime.openvino import open_openvino

    return open_openvino(path, provider, threads=1, shapes=mode)


def test_openvino_target_is_offered_and_registered() -> None:
    assert set(OPENVINO_TARGETS) <= set(TARGETS) and OPENVINO_TARGETS[0] == "openvino"
    assert "standard" not in OPENVINO_TARGETS and "function" not in OPENVINO_TARGETS


@pytest.mark.parametrize("name", MODELS)
def test_openvino_form_has_no_groupnorm_node_and_one_call_each(name: str, exports) -> None:
    function = read_model(exports.exported(name).path)
    model = read_model(exports.exported(name, "openvino").path)
    calls = [n for n in function.graph.node if n.domain == DOMAIN]
    ops = Counter(node.op_type for node in model.graph.node)
    marked = [n for n in model.graph.node if n.name.endswith(OUTPUT_SUFFIX)]
    assert len(marked) == len(calls) > 0
    assert ops["GroupNormalization"] == 0 and not any(n.domain == DOMAIN for n in model.graph.node)
    # instance norm (one channel a group) is one InstanceNormalization; no other call reshapes its activation
    assert ops["InstanceNormalization"] == sum(1 for n in marked if n.op_type == "InstanceNormalization")
    activations = {n.input[0] for n in calls}
    assert not [n.name for n in model.graph.node if n.op_type == "Reshape" and n.input[0] in activations]
    check_counts(model, "openvino", len(calls), allow_batchnorm=False)
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("level", LEVELS, ids=str)
@pytest.mark.parametrize("shape,groups", SHAPES_GROUPS + [((2, 64, 28, 28), 32)], ids=shape_id)
@pytest.mark.parametrize("mean,bound", [(0.0, FP32_BOUND), (1000.0, FP32_MEAN1000_BOUND)], ids=["mean0", "mean1000"])
def test_openvino_form_matches_float64_under_onnxruntime(shape: tuple[int, ...], groups: int, mean: float,
                                                        bound: float, level: str) -> None:
    """Two-pass statistics: at input mean 1000 within the bound every function body meets (measured <= 6.4e-5)."""
    model = to_channel_stats(one_node_model(shape, groups, EPS, onnx.TensorProto.FLOAT))
    err = relative_error(inputs(shape, mean, np.float32), groups, EPS, model, LEVELS[level])
    assert err < bound, f"relative error {err:.2e} >= {bound:.0e}"


def test_openvino_form_leaves_float16_calls_to_the_fast_form() -> None:
    model = to_channel_stats(one_node_model((2, 8, 5, 5), 4, EPS, onnx.TensorProto.FLOAT16))
    assert Counter(n.op_type for n in model.graph.node)["InstanceNormalization"] == 1
    assert not any(n.name.endswith(OUTPUT_SUFFIX) for n in model.graph.node)


@needs_openvino
@pytest.mark.parametrize("shape,groups", SHAPES_GROUPS + [((2, 64, 28, 28), 32)], ids=shape_id)
@pytest.mark.parametrize("mean,bound", [(0.0, FP32_BOUND), (1000.0, FP32_MEAN1000_BOUND)], ids=["mean0", "mean1000"])
def test_openvino_form_matches_float64_under_openvino(shape: tuple[int, ...], groups: int, mean: float,
                                                      bound: float) -> None:
    import openvino as ov

    model = to_channel_stats(one_node_model(shape, groups, EPS, onnx.TensorProto.FLOAT))
    feeds = inputs(shape, mean, np.float32)
    compiled = ov.Core().compile_model(ov.Core().read_model(model.SerializeToString(), b""), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(feeds)[0].astype(np.float64)
    ref = reference(feeds, groups, EPS)
    err = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert err < bound, f"relative error {err:.2e} >= {bound:.0e}"


@needs_openvino
@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("target", OPENVINO_TARGETS)
@pytest.mark.parametrize("name", MODELS)
def test_offered_file_compiles_and_runs_with_static_and_dynamic_batch(name: str, target: str, mode: str,
                                                                      exports) -> None:
    """Every file offered to OpenVINO users, reshaped to a fixed batch (``static``) or as written (dynamic
    batch), at batch 1 and 3, matches torch within 1e-4 and onnxruntime within the same."""
    path = exports.exported(name, target).path
    session = _session(path, mode)
    x = exports.crops(3)
    ref = exports.converted(name)(x).detach().numpy()
    ort_out = _onnxruntime(path, x.numpy())
    for batch in (1, 3):
        got = session.run(None, {"input": x[:batch].numpy()})[0]
        assert got.shape == ref[:batch].shape
        assert float(np.abs(got - ref[:batch]).max()) < TORCH_BOUND, f"{name} {target} {mode} batch {batch}"
        assert float(np.abs(got - ort_out[:batch]).max()) < TORCH_BOUND
    if mode == "static":
        assert len(session._compiled) == 2  # one model compiled per batch, each reshaped to it


def _onnxruntime(path: Path, x: np.ndarray) -> np.ndarray:
    from gn_convert.runtime import open_session

    out: np.ndarray = open_session(path).run(None, {"input": x})[0]
    return out


def _compile_in_child(path: Path, batch: int | None) -> int:
    """Compile ``path`` with OpenVINO in a child process (reshaped to ``batch`` when given); its exit status."""
    code = ("import sys, openvino as ov; c = ov.Core(); m = c.read_model(sys.argv[1]); "
            "b = int(sys.argv[2]); b and m.reshape([b, 3, 64, 64]); "
            "c.compile_model(m, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})")
    done = subprocess.run([sys.executable, "-c", code, str(path), str(batch or 0)], capture_output=True, timeout=600)
    return done.returncode


@needs_openvino
@pytest.mark.parametrize("name", MODELS)
def test_static_batch_crash_case_runs_in_a_subprocess_and_the_offered_file_does_not_crash(name: str, exports,
                                                                                        capsys) -> None:
    """The issue's crash: the ``standard`` file reshaped to a static batch (a residual block's
    GroupNormalization; scripts/openvino_segfault_repro.py). Its outcome is printed, not asserted (a later
    OpenVINO may fix it); the files gn-convert offers must compile with a static and a dynamic batch."""
    standard = _compile_in_child(exports.exported(name, "standard").path, 1)
    with capsys.disabled():
        outcome = f"crashed ({signal.Signals(-standard).name})" if standard < 0 else f"exit {standard}"
        print(f"\n{name}: the standard file reshaped to batch 1 under OpenVINO: {outcome}")
    for target in OPENVINO_TARGETS:
        for batch in (1, None):
            assert _compile_in_child(exports.exported(name, target).path, batch) == 0, (target, batch)


@needs_openvino
def test_segfault_repro_script_reports_each_case() -> None:
    done = subprocess.run([sys.executable, str(SCRIPTS / "openvino_segfault_repro.py"), "--json"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    outcomes = json.loads(done.stdout)["outcomes"]
    for case in ("dynamic", "static, SNIPPETS_MODE=DISABLE", "static, Add of the model input"):
        assert outcomes[case] == "ok", outcomes
    assert outcomes["static"] in ("ok", "crashed (SIGSEGV)"), outcomes  # "ok" once OpenVINO fixes it


@needs_openvino
def test_a_crash_while_compiling_is_a_session_error_not_a_dead_process(tmp_path: Path) -> None:
    repro = load_script("openvino_segfault_repro")
    path = tmp_path / "repro.onnx"
    onnx.save(repro.build("relu", "N"), path)
    if _compile_in_child_raw(path) >= 0:
        pytest.skip("this OpenVINO does not crash on the repro (fixed upstream): nothing to catch")
    session = _session(path, "static")  # the dynamic file compiles lazily per shape in static mode
    with pytest.raises(SessionError, match="crashed \\(SIGSEGV\\)"):
        session.run(None, {"x": np.ones((1, 4, 2, 2), np.float32)})
    assert session.run is not None  # still here


def _compile_in_child_raw(path: Path) -> int:
    code = ("import sys, openvino as ov; c = ov.Core(); m = c.read_model(sys.argv[1]); m.reshape([1, 4, 2, 2]); "
            "c.compile_model(m, 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})")
    return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=600).returncode


@needs_openvino
def test_parity_runs_openvino_f32_and_default_in_both_shape_modes(exports) -> None:
    name = MODELS[0]
    report = check_parity(exports.converted(name), exports.exported(name, "openvino").path,
                          providers="openvino,openvino-default")
    assert report.passed, report.table()
    rows = {(r.provider, r.level) for r in report.rows}
    assert rows == {(p, m) for p in ("openvino", "openvino-default") for m in ("dynamic", "static")}
    f32 = max(r.metrics.max_rel for r in report.rows if r.provider == "openvino" and not r.inputs.startswith("large"))
    assert f32 < 1e-4
    assert "openvino-default" in report.table()


@needs_openvino
def test_parity_names_the_openvino_crash_as_a_failed_row(exports) -> None:
    name = MODELS[0]
    report = check_parity(exports.converted(name), exports.exported(name, "standard").path, providers="openvino",
                          localise_failures=False)
    if "openvino/static" not in report.errors:
        pytest.skip("this OpenVINO compiles the standard file with a static batch (fixed upstream)")
    assert not report.passed and "crashed" in report.errors["openvino/static"]
    assert {(r.provider, r.level) for r in report.rows} == {("openvino", "dynamic")}


def test_parity_skips_openvino_with_the_reason_when_it_is_absent(exports, monkeypatch: pytest.MonkeyPatch) -> None:
    import gn_convert.runtime.openvino as runtime_openvino

    def absent() -> str:
        raise ProviderUnavailableError(f"openvino is not installed: {runtime_openvino.INSTALL}")

    monkeypatch.setattr(runtime_openvino, "openvino_version", absent)
    name = MODELS[0]
    report = check_parity(exports.converted(name), exports.exported(name, "openvino").path,
                          providers="cpu,openvino,openvino-default")
    assert report.passed and set(report.skipped) == {"openvino", "openvino-default"}
    assert "gn-convert[openvino]" in report.skipped["openvino"]


@needs_openvino
def test_openvino_bench_variant_times_both_shape_modes(exports) -> None:
    from gn_convert.bench.harness import run_bench
    from gn_convert.bench.variants import openvino_variant

    path = exports.exported(MODELS[0], "openvino").path
    variants = [openvino_variant(mode, _session(path, mode)) for mode in ("dynamic", "static")]
    result = run_bench(variants, (3, 64, 64), batches=(1, 2), rounds=1, warmup=0, baseline="dynamic",
                       engine=("OpenVINO", "test"))
    assert {(m.variant, m.batch) for m in result.measurements} == {(v, b) for v in ("dynamic", "static")
                                                                   for b in (1, 2)}
    assert result.table().startswith("OpenVINO test")


def test_openvino_session_is_onnxruntime_shaped(exports) -> None:
    """The session offers what parity and the comparisons call (inputs' names, shapes and types)."""
    if not HAS_OPENVINO:
        pytest.skip("openvino is not installed: pip install 'gn-convert[openvino]'")
    session = _session(exports.exported(MODELS[0], "openvino").path, "dynamic")
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("input", "tensor(float)", [3, 64, 64])
    assert not isinstance(inp.shape[0], int) and out.name == "output"
    assert session.inference_precision == "f32" and "OpenVINO" in session.get_providers()[0]
    x = torch.zeros(2, 3, 64, 64).numpy()
    assert session.run(["output"], {"input": x})[0].shape[0] == 2
