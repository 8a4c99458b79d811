"""``gn-convert export`` and the ONNX stage of ``gn-convert MODEL``: outputs, and bad input
answered with one line, exit status 2 and no file left behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import gn_convert
from gn_convert.cli import main
from gn_convert.load.names import build_model
from gn_convert.onnx import read_model
from gn_convert.onnx.op import groupnorm_nodes
from helpers.models import SIZE


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, exports) -> Path:
    """A checkpoint folder of the converted resnet18 (as `gn-convert MODEL` writes it)."""
    folder = tmp_path_factory.mktemp("ckpt") / "gn-resnet18"
    model = exports.converted("resnet18")
    plan = gn_convert.plan(exports.teacher("resnet18"), groups=32)
    gn_convert.save(model, folder, plan=plan, architecture="resnet18", source_weights="none",
                    extra={"input_size": [SIZE, SIZE]})
    return folder


def run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("gn-convert: error:")]
    assert len(errors) == 1, err
    return errors[0]


def test_export_checkpoint_matches_the_checkpoint_model(checkpoint: Path, tmp_path: Path, capsys, exports) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", str(checkpoint), "-o", str(out)]) == 0
    assert f"wrote {out} (function, 20 GroupNorm nodes" in capsys.readouterr().out
    model = gn_convert.load_converted(checkpoint)
    onnx_model = read_model(out)
    dims = [d.dim_value for d in onnx_model.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, SIZE, SIZE]  # the checkpoint's recorded input size
    props = {p.key: p.value for p in onnx_model.metadata_props}
    assert props["source_architecture"] == "resnet18" and props["source_weights"] == "none"
    assert len(groupnorm_nodes(onnx_model)) == 20
    x = exports.crops()
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(run_ort(out, x) - ref).max() / np.abs(ref).max() < 1e-4


def test_export_model_name_as_baseline_keeps_no_custom_node(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bn.onnx"
    assert main(["export", "resnet18", "--weights", "none", "--baseline", "--input-shape", "1,3,32,32",
                 "--target", "inlined", "-o", str(out)]) == 0
    assert f"wrote {out} (BatchNorm baseline, " in capsys.readouterr().out
    onnx_model = read_model(out)
    assert not groupnorm_nodes(onnx_model) and len(onnx_model.graph.node) > 20


def _unconverted_checkpoint(checkpoint: Path, tmp_path: Path) -> Path:
    """A checkpoint whose plan converts nothing: loading it gives the BatchNorm model."""
    folder = tmp_path / "bn-ckpt"
    folder.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    config["plan"]["layers"] = []
    (folder / "config.json").write_text(json.dumps(config))
    state = build_model("resnet18").state_dict()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("case", ["missing-checkpoint", "unwritable-path", "still-batchnorm", "bad-shape",
                                  "unknown-model"])
def test_bad_input_one_line_exit_2_no_file(case: str, checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out" / "m.onnx"
    source, extra, expect = str(checkpoint), [], ""
    if case == "missing-checkpoint":
        source, expect = str(tmp_path / "no-such-ckpt"), "checkpoint folder"
    elif case == "unwritable-path":
        (tmp_path / "out").write_text("a file, not a folder")
        expect = "cannot write"
    elif case == "still-batchnorm":
        source, expect = str(_unconverted_checkpoint(checkpoint, tmp_path)), "BatchNorm layers"
    elif case == "bad-shape":
        extra, expect = ["--input-shape", "1,3"], "--input-shape"
    else:
        source, expect = "resnet_does_not_exist", "unknown model"
    before = sorted(tmp_path.rglob("*"))
    assert main(["export", source, "-o", str(out), *extra]) == 2
    assert expect in one_error_line(capsys)
    assert sorted(tmp_path.rglob("*")) == before


def test_parity_command_exit_codes_and_json(checkpoint: Path, tmp_path: Path, capsys, exports) -> None:
    good, report_file = exports.exported("resnet18").path, tmp_path / "parity.json"
    assert main(["parity", str(good), "--checkpoint", str(checkpoint), "--levels", "all", "--batch", "2",
                 "--json", str(report_file)]) == 0
    assert "parity PASSED" in capsys.readouterr().out
    data = json.loads(report_file.read_text())
    assert data["passed"] is True and len(data["rows"]) == 6 and data["invariance"][0]["max_rel"] <= 1e-5
    # a tolerance no float32 run can meet: the check runs and fails (exit 1), naming a layer
    assert main(["parity", str(good), "--checkpoint", str(checkpoint), "--levels", "all", "--batch", "2",
                 "--max-rel", "1e-12"]) == 1
    assert "first GroupNorm layer above 1e-12: bn1" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["not-onnx", "mismatched", "missing-checkpoint"])
def test_parity_command_bad_input_one_line_exit_2(case: str, checkpoint: Path, tmp_path: Path, capsys, exports) -> None:
    onnx_file, ckpt, expect = exports.exported("resnet18").path, checkpoint, ""
    if case == "not-onnx":
        onnx_file, expect = tmp_path / "x.onnx", "not a readable ONNX model"
        onnx_file.write_text("hello")
    elif case == "mismatched":
        onnx_file, expect = exports.exported("mobilenet_v3_small").path, "does not match"
    else:
        ckpt, expect = tmp_path / "nope", "not a gn-convert checkpoint"
    json_file = tmp_path / "out.json"
    assert main(["parity", str(onnx_file), "--checkpoint", str(ckpt), "--json", str(json_file)]) == 2
    assert expect in one_error_line(capsys)
    assert not json_file.exists()


def test_main_command_writes_model_onnx_and_parity_into_report(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gn-resnet18"
    assert main(["resnet18", "--weights", "none", "-o", str(out)]) == 0
    # .gn-convert: the marker of every folder gn-convert stages (gn_convert.atomic.MARKER), what --force checks
    assert sorted(p.name for p in out.iterdir()) == [".gn-convert", "config.json", "model.onnx", "model.safetensors",
                                                     "report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["onnx"]["counts"]["custom"] == 20 and report["onnx"]["input_shape"] == [1, 3, 224, 224]
    assert report["parity"]["passed"] is True and report["parity"]["onnx_path"] == "model.onnx"
    assert {r["batch"] for r in report["parity"]["rows"]} == {1, 2}
    assert "parity passed on cpu (12 comparisons" in capsys.readouterr().err


def test_cli_targets_are_the_exporters_and_reading_them_imports_no_onnx() -> None:
    """The CLI's --target choices are the exporter's TARGETS map; gn_convert.onnx.targets is
    readable without importing onnx (gn_convert.onnx imports its modules on first use)."""
    import subprocess
    import sys

    from gn_convert.cli import build_parser
    from gn_convert.onnx import TARGETS

    export = next(a for a in build_parser()._subparsers._group_actions[0].choices["export"]._actions
                  if "--target" in a.option_strings)
    assert list(export.choices) == list(TARGETS) and {"function", "inlined", "standard", "fast", "ms-groupnorm"} <= set(TARGETS)
    code = ("import sys; from gn_convert.onnx.targets import TARGETS, describe; describe(); "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-500:]




def test_parity_on_the_batchnorm_baseline_says_so_in_one_line(checkpoint: Path, tmp_path: Path, capsys) -> None:
    """Defect: `gn-convert parity bn.onnx --checkpoint CKPT` on the BatchNorm baseline failed
    with a confusing mismatch instead of naming the mistake."""
    bn = tmp_path / "bn.onnx"
    assert main(["export", "resnet18", "--weights", "none", "--baseline", "--input-shape", f"1,3,{SIZE},{SIZE}",
                 "-o", str(bn)]) == 0
    capsys.readouterr()
    assert main(["parity", str(bn), "--checkpoint", str(checkpoint)]) == 2
    line = one_error_line(capsys)
    assert "looks like the BatchNorm original" in line and "model.onnx" in line


def test_parity_takes_the_native_library_given(checkpoint: Path, tmp_path: Path, capsys, exports) -> None:
    """--native-library PATH is the library checked (a file that is not one is reported, not rebuilt)."""
    bogus = tmp_path / "libbogus.so"
    bogus.write_bytes(b"not a library")
    report_file = tmp_path / "p.json"
    assert main(["parity", str(exports.exported("resnet18").path), "--checkpoint", str(checkpoint),
                 "--providers", "cpu,cpu-native", "--native-library", str(bogus), "--levels", "all",
                 "--batch", "2", "--json", str(report_file)]) == 0
    data = json.loads(report_file.read_text())
    assert set(data["skipped"]) == {"cpu-native"} and str(bogus) in data["skipped"]["cpu-native"]


def test_the_main_command_fails_when_the_native_kernel_it_was_asked_to_check_never_ran(tmp_path: Path,
                                                                                      capsys) -> None:
    """Defect: with --native and a library onnxruntime refuses, cpu-native was skipped and the run said
    "parity passed on cpu, cpu-native" with exit 0."""
    bogus = tmp_path / "libbogus.so"
    bogus.write_bytes(b"not a library")
    out = tmp_path / "out"
    assert main(["resnet18", "--weights", "none", "--input-size", "32", "--native", "--native-library", str(bogus),
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "parity FAILED on cpu (" in err and "cpu-native did not run" in err
    report = json.loads((out / "report.json").read_text())
    assert report["parity"]["passed"] is False and report["parity"]["providers"] == ["cpu"]
