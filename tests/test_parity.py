"""check_parity: passing models pass, a corrupted layer fails and is named, samples that
interact are caught, absent providers are reported, mismatched files are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from gn_convert.errors import OnnxFileError, ParityError, SessionError
from gn_convert.onnx import export_onnx
from gn_convert.parity import check as parity_check
from gn_convert.parity import check_parity, compare
from gn_convert.parity.providers import availability
from gn_convert.parity.tolerances import DEFAULT_TOLERANCES, Tolerance, tolerance_for
from gn_convert.testing.photos import photo_crops
from helpers.models import MODELS, SIZE
from helpers.parity import corrupt_scale

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.parametrize("name", MODELS)
def test_converted_model_passes_on_cpu_at_both_levels(name: str, exports) -> None:
    report = check_parity(exports.converted(name), exports.exported(name).path)
    assert report.passed, report.table()
    assert {(r.level, r.inputs, r.batch) for r in report.rows} == {
        (level, inputs, batch) for level in ("off", "all") for inputs in ("random", "large-mean", "large-scale")
        for batch in (1, 8)}
    assert max(r.metrics.max_rel for r in report.rows if r.inputs == "random") < 1e-4
    assert min(r.metrics.top1 for r in report.rows) == 1.0
    assert [i.max_rel <= 1e-5 for i in report.invariance] == [True, True]
    assert not report.localisation and not report.failures()


@pytest.mark.parametrize("target", ["inlined", "standard"])
def test_lowered_targets_pass(target: str, exports) -> None:
    report = check_parity(exports.converted("resnet18"), exports.exported("resnet18", target).path, levels=("all",), batch=4)
    assert report.passed, report.table()


@pytest.mark.parametrize("target", ["function", "inlined"])
def test_corrupted_groupnorm_scale_fails_and_names_the_layer(tmp_path: Path, target: str, exports) -> None:
    bad = tmp_path / "corrupt.onnx"
    corrupt_scale(exports.exported("resnet18").path, exports.exported("resnet18", target).path, "layer2.0.bn1", bad)
    report = check_parity(exports.converted("resnet18"), bad, levels=("all",), batch=4)
    assert not report.passed
    assert all(not r.passed for r in report.rows if r.inputs == "random")
    found = report.localisation["cpu/all"]
    assert found.first_failing == "layer2.0.bn1"
    errors = {e.layer: e.max_rel for e in found.layers}
    assert errors["layer1.1.bn2"] < 1e-4 < errors["layer2.0.bn1"]
    assert "first GroupNorm layer above 1e-04: layer2.0.bn1" in report.table()


class _BatchCentered(nn.Module):
    """Samples interact: each output subtracts the batch mean (BatchNorm in training semantics)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x))
        return (y - y.mean(dim=0, keepdim=True)).flatten(1)


def test_batch_independence_catches_samples_that_interact(tmp_path: Path) -> None:
    model = _BatchCentered().eval()
    path = export_onnx(model, tmp_path / "c.onnx", input_shape=(1, 3, 10, 10)).path
    report = check_parity(model, path, levels=("all",), batch=4)
    assert not report.passed
    assert [i.passed for i in report.invariance] == [False]
    assert report.invariance[0].max_rel > 0.1


def test_groupnorm_model_is_batch_independent(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(1)).eval()
    path = export_onnx(model, tmp_path / "g.onnx", input_shape=(1, 3, 10, 10)).path
    report = check_parity(model, path, levels=("off",), batch=4)
    assert report.passed and report.invariance[0].max_rel <= 1e-6


def test_a_file_with_a_static_batch_above_one_is_checked_at_its_batch(tmp_path: Path) -> None:
    """Defect a review found: the batch-independence check ran one sample alone through a file whose batch is
    fixed at 3, so every such file failed with onnxruntime's shape error."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(1)).eval()
    path = export_onnx(model, tmp_path / "s.onnx", input_shape=(3, 3, 10, 10), dynamic_batch=False).path
    report = check_parity(model, path, levels=("all",))
    assert report.passed and not report.errors and {r.batch for r in report.rows} == {3} and not report.invariance


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is present: the provider runs instead of being skipped")
def test_absent_providers_are_reported_with_the_reason(exports) -> None:
    report = check_parity(exports.converted("resnet18"), exports.exported("resnet18").path, providers="cpu,cuda,tensorrt",
                          levels=("all",), batch=2)
    assert set(report.skipped) == {"cuda", "tensorrt"}
    assert "onnxruntime-gpu" in report.skipped["cuda"]
    assert report.passed and {r.provider for r in report.rows} == {"cpu"}


def test_image_folder_adds_an_input_set(tmp_path: Path, exports) -> None:
    from PIL import Image

    for i, crop in enumerate(photo_crops(3, 80, seed=5)):
        pixels = ((crop - crop.min()) / (crop.max() - crop.min()) * 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    report = check_parity(exports.converted("resnet18"), exports.exported("resnet18").path, levels=("all",), batch=2,
                          images=tmp_path)
    rows = [r for r in report.rows if r.inputs == "images"]
    assert [r.batch for r in rows] == [1, 2] and all(r.passed for r in rows)


def test_mismatched_and_invalid_files_are_refused(tmp_path: Path, exports) -> None:
    with pytest.raises(ParityError, match="GroupNorm layer features"):
        check_parity(exports.converted("resnet18"), exports.exported("mobilenet_v3_small").path)
    other = nn.Sequential(nn.Conv2d(5, 4, 3), nn.GroupNorm(2, 4)).eval()
    expected = r"fails in PyTorch \(RuntimeError: .*expected input\[1, 3, 64, 64\] to have 5 channels"
    with pytest.raises(ParityError, match=expected):
        check_parity(other, exports.exported("resnet18").path)
    (tmp_path / "x.onnx").write_bytes(b"not an onnx file at all")
    with pytest.raises(OnnxFileError, match="not a readable ONNX model"):
        check_parity(exports.converted("resnet18"), tmp_path / "x.onnx")
    with pytest.raises(ParityError, match="unknown provider"):
        check_parity(exports.converted("resnet18"), exports.exported("resnet18").path, providers="gpu")


def test_compare_metrics_on_known_outputs() -> None:
    ref = np.array([[1.0, 5.0, 3.0, 2.0, 4.0, 0.0], [6.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    out = ref.copy()
    out[1, 0] = 0.0  # sample 1: class 0 drops out of the top-1 and top-5
    m = compare(ref, out)
    assert m.max_abs == 6.0 and m.max_rel == 1.0
    assert m.top1 == 0.5 and m.top5 == pytest.approx((1.0 + 0.8) / 2)
    assert m.cosine == pytest.approx(float(ref[1] @ out[1] / np.linalg.norm(ref[1]) / np.linalg.norm(out[1])))
    assert compare(ref, out * np.nan).max_rel == float("inf")


@pytest.mark.cuda
def test_fp16_export_parity_on_cuda(tmp_path: Path, exports) -> None:
    if not HAS_CUDA:
        pytest.skip("no CUDAExecutionProvider (install onnxruntime-gpu on a machine with an NVIDIA GPU)")
    model = exports.converted("resnet18")
    for fp16 in (False, True):
        path = export_onnx(model, tmp_path / f"m{int(fp16)}.onnx", input_shape=(1, 3, SIZE, SIZE), fp16=fp16).path
        report = check_parity(model, path, providers="cuda")
        print(report.table())
        if "cuda" in report.skipped or "cuda/all" in report.skipped:
            pytest.skip(f"CUDA provider could not start: {report.skipped}")
        assert report.passed, report.table()


def test_tolerance_rises_only_to_the_float32_references_own_noise(monkeypatch: pytest.MonkeyPatch, exports) -> None:
    """With a default bound no float32 runtime can meet, rows pass exactly when onnxruntime is
    within twice torch float32's own distance from a float64 run, and the raised bound is that;
    the same bound given by the user is taken literally."""
    model = exports.converted("resnet18")
    impossible = Tolerance(1e-12, 0.99999, 1e-5)
    literal = check_parity(model, exports.exported("resnet18").path, levels=("all",), batch=2,
                           tolerances={("cpu", "float32"): impossible}, localise_failures=False)
    assert not literal.passed and {r.tolerance.max_rel for r in literal.rows if r.inputs == "random"} == {1e-12}
    monkeypatch.setitem(DEFAULT_TOLERANCES, ("cpu", "float32"), impossible)
    report = check_parity(model, exports.exported("resnet18").path, levels=("all",), batch=2, localise_failures=False)
    random = sets_of(report, "random")
    x = torch.randn(2, *report.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        noise = float((model(x).double() - exact).abs().max() / exact.abs().max())
        cosine = float(torch.nn.functional.cosine_similarity(model(x).double(), exact).min())
    assert 1e-8 < noise < 1e-4
    for row in random:
        assert row.tolerance.max_rel == pytest.approx(2 * noise, rel=1e-6)
        assert row.tolerance.min_cosine == pytest.approx(min(0.99999, 1 - 2 * (1 - cosine)), abs=1e-12)
        assert row.passed == (row.metrics.max_rel <= 2 * noise)
    assert report.passed, report.table()


def sets_of(report, name: str) -> list:
    return [r for r in report.rows if r.inputs == name]


def test_a_provider_that_fails_to_run_is_a_reported_failure_not_a_crash(monkeypatch: pytest.MonkeyPatch,
                                                                         exports) -> None:
    """Defect: an onnxruntime error while running a provider escaped check_parity as a crash."""
    def refuse(sess, feeds, outputs=None):
        raise SessionError("onnxruntime failed to run the model: injected kernel failure")

    monkeypatch.setattr(parity_check, "run_session", refuse)
    report = check_parity(exports.converted("resnet18"), exports.exported("resnet18").path, levels=("off", "all"),
                          batch=2)
    assert not report.passed and not report.rows
    assert report.errors == {f"cpu/{level}": "onnxruntime failed to run the model: injected kernel failure"
                             for level in ("off", "all")}
    assert "cpu/all: failed to run: onnxruntime failed to run the model" in report.table()
    assert report.to_dict()["passed"] is False


def test_a_provider_that_fails_to_start_is_a_reported_failure(monkeypatch: pytest.MonkeyPatch, exports) -> None:
    from gn_convert.errors import ProviderUnavailableError

    def refuse(*args, **kwargs):
        raise ProviderUnavailableError("onnxruntime could not start CPUExecutionProvider (injected)")

    monkeypatch.setattr(parity_check, "open_session", refuse)
    report = check_parity(exports.converted("resnet18"), exports.exported("resnet18").path, levels=("all",),
                          batch=2)
    assert not report.passed and set(report.errors) == {"cpu/all"} and "injected" in report.errors["cpu/all"]


def test_native_availability_loads_the_library_and_refuses_a_file_that_is_not_one(tmp_path: Path) -> None:
    """Defect: ``cpu-native`` counted as available when the library file merely existed."""
    bogus = tmp_path / "libgn_convert_ops.so"
    bogus.write_bytes(b"not a shared library")
    found = availability("cpu-native", bogus)
    assert not found.available and found.library is None
    assert f"onnxruntime cannot load {bogus}" in found.reason
    missing = availability("cpu-native", tmp_path / "none.so")
    assert not missing.available and "not found" in missing.reason


def test_native_library_that_does_not_load_is_skipped_with_its_reason(tmp_path: Path, exports) -> None:
    bogus = tmp_path / "libbogus.so"
    bogus.write_bytes(b"\x7fELF but not really")
    report = check_parity(exports.converted("resnet18"), exports.exported("resnet18").path,
                          providers="cpu,cpu-native", levels=("all",), batch=2, native_library=bogus)
    assert set(report.skipped) == {"cpu-native"} and "cannot load" in report.skipped["cpu-native"]
    assert {r.provider for r in report.rows} == {"cpu"} and report.passed


@pytest.mark.parametrize("provider,dtype", [("cpu", "bfloat16"), ("cuda", "float64"), ("vulkan", "float32")])
def test_an_unknown_provider_or_dtype_has_no_borrowed_tolerance(provider: str, dtype: str) -> None:
    """Defect: bfloat16 silently used the float16 bound."""
    with pytest.raises(ParityError, match=f"no parity tolerance for {provider} with {dtype}"):
        tolerance_for(provider, dtype)
    assert tolerance_for("cpu", "float16") == DEFAULT_TOLERANCES[("cpu", "float16")]
    given = Tolerance(1e-2, 0.99, 1e-3)
    assert tolerance_for(provider, dtype, {(provider, dtype): given}) is given


@pytest.mark.parametrize(("installed", "expected"), [
    (["onnxruntime"], "on a machine with an NVIDIA GPU, replace onnxruntime with onnxruntime-gpu: pip uninstall"),
    (["onnxruntime", "onnxruntime-gpu"], "onnxruntime and onnxruntime-gpu are both installed and overwrite each "
                                         "other's files: pip uninstall -y onnxruntime onnxruntime-gpu && pip install")])
def test_the_cuda_skip_reason_says_how_to_install_onnxruntime_gpu(monkeypatch, installed: list[str],
                                                                   expected: str) -> None:
    import onnxruntime as ort

    from gn_convert.errors import ProviderUnavailableError
    from gn_convert.runtime import options

    monkeypatch.setattr(options, "installed_runtimes", lambda: installed)
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ProviderUnavailableError, match="^CUDAExecutionProvider is not available") as info:
        options.check_provider("cuda")
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_verdict_never_passes_on_what_was_not_compared() -> None:
    """Defects a review found: a reference that overflowed opened the bound to infinity (an all-NaN file then
    passed), outputs of another shape broadcast against the reference, and a detection layer row whose first
    failing layer was named could still pass."""
    import numpy as np

    from gn_convert.parity.detections import LayerRow
    from gn_convert.parity.metrics import compare
    from gn_convert.parity.tolerances import Tolerance

    bound = Tolerance(1e-4, 0.99999, 1e-4)
    assert bound.within_noise(float("inf"), -1.0) == bound and bound.within_noise(1e-3, 0.9999).max_rel == 2e-3
    reference = np.ones((2, 3), np.float32)
    assert compare(reference, np.ones((1, 3), np.float32)).max_rel == float("inf")
    assert compare(reference, np.ones((2, 1), np.float32)).max_rel == float("inf")
    assert compare(reference, reference.copy()).max_rel == 0.0
    assert not LayerRow("cpu", 0, 10, 1e-5, 1e-4, "backbone.body.bn1").passed
    assert LayerRow("cpu", 0, 10, 1e-5, 1e-4, None).passed


def test_a_rewrite_that_drops_an_output_is_caught() -> None:
    """Defect a review found: the sessions' outputs were zipped, so a rewritten model that lost an output
    compared only the outputs both had, and passed."""
    from types import SimpleNamespace

    from gn_convert.errors import SessionError
    from gn_convert.runtime.compare import compare_sessions

    def session(outputs: int) -> SimpleNamespace:
        inputs = [SimpleNamespace(name="x", type="tensor(float)", shape=["N", 3])]
        return SimpleNamespace(get_inputs=lambda: inputs, run=lambda names, feeds: [feeds["x"] * 2] * outputs)

    assert compare_sessions(session(2), session(2), "the rewrite", SessionError, 1e-6, "") == 0.0
    with pytest.raises(SessionError, match="1 where it had 2"):
        compare_sessions(session(2), session(1), "the rewrite", SessionError, 1e-6, "")
