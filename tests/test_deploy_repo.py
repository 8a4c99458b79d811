"""The Triton model repository writer: configs checked with Triton's own protobuf schema."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gn_convert.cli import main
from gn_convert.deploy import (
    DeployError,
    ServeExtraMissingError,
    TritonModelServer,
    labels_beside,
    read_model_io,
    write_triton_repo,
)
from gn_convert.errors import OptionError, OutputError
from gn_convert.pipeline import PipelineOptions, _deploy_stage, check_options
from gn_convert.stages import Stages
from gn_convert.tasks import CLASSIFICATION
from helpers.models import MODELS, SIZE
from helpers.triton import parsed

MISSING = ""
try:
    from google.protobuf import text_format  # noqa: F401 (the config text format: skip the module without it)
    from tritonclient.grpc import model_config_pb2 as pb
except ImportError as err:
    pb = None
    MISSING = f"the serve extra is not installed ({err.name}); pip install 'gn-convert[serve]'"

needs_serve = pytest.mark.skipif(pb is None, reason=MISSING)


def run_model(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@needs_serve
@pytest.mark.parametrize("name", MODELS)
def test_config_names_graph_tensors_types_and_dims(name: str, tmp_path: Path, exports) -> None:
    source = exports.exported(name).path
    model_dir = write_triton_repo(source, tmp_path / "repo", name=name)
    config = parsed(model_dir)
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    assert config.name == name and config.backend == "onnxruntime"
    assert config.max_batch_size == 8
    assert [t.name for t in config.input] == [i.name for i in session.get_inputs()] == ["input"]
    assert [t.name for t in config.output] == [o.name for o in session.get_outputs()] == ["output"]
    assert [t.data_type for t in (*config.input, *config.output)] == [pb.TYPE_FP32, pb.TYPE_FP32]
    assert list(config.input[0].dims) == [3, SIZE, SIZE]  # batch dimension left to max_batch_size
    assert list(config.output[0].dims) == [1000]
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert [(g.kind, g.count) for g in config.instance_group] == [(pb.ModelInstanceGroup.KIND_CPU, 1)]
    assert (model_dir / "1" / "model.onnx").read_bytes() == source.read_bytes()
    assert sorted(p.name for p in tmp_path.joinpath("repo").iterdir()) == [name]  # no staging left


@needs_serve
def test_gpu_instances_and_no_batching_keep_the_batch_dim(tmp_path: Path, exports) -> None:
    model_dir = write_triton_repo(exports.exported("resnet18").path, tmp_path, name="r18", max_batch_size=0,
                                  instance="gpu", instance_count=2)
    config = parsed(model_dir)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [-1, 3, SIZE, SIZE]
    assert list(config.output[0].dims) == [-1, 1000]
    assert [(g.kind, g.count) for g in config.instance_group] == [(pb.ModelInstanceGroup.KIND_GPU, 2)]


@needs_serve
def test_labels_file_has_one_line_per_class(tmp_path: Path, exports) -> None:
    labels = [f"class {i}" for i in range(1000)]
    model_dir = write_triton_repo(exports.exported("resnet18").path, tmp_path, labels=labels)
    assert model_dir.name == "resnet18"
    assert parsed(model_dir).output[0].label_filename == "labels.txt"
    assert (model_dir / "labels.txt").read_text().splitlines() == labels
    with pytest.raises(DeployError, match="10 labels fit no single output"):
        write_triton_repo(exports.exported("resnet18").path, tmp_path, name="other", labels=labels[:10])
    assert not (tmp_path / "other").exists()


@needs_serve
def test_inlined_model_has_no_custom_op_and_same_outputs(tmp_path: Path, exports) -> None:
    source = exports.exported("mobilenet_v3_small").path
    model_dir = write_triton_repo(source, tmp_path, inlined=True)
    shipped = onnx.load(str(model_dir / "1" / "model.onnx"))
    assert not shipped.functions
    assert not [n for n in shipped.graph.node if n.domain == "ai.gn_convert"]
    assert {p.key: p.value for p in shipped.metadata_props}["gn_convert.target"] == "inlined"
    x = exports.crops(2).numpy()
    np.testing.assert_array_equal(run_model(model_dir / "1" / "model.onnx", x), run_model(source, x))


@needs_serve
def test_existing_model_needs_force_and_failures_leave_nothing(tmp_path: Path, monkeypatch, exports) -> None:
    source = exports.exported("resnet18").path
    model_dir = write_triton_repo(source, tmp_path, max_batch_size=4)
    with pytest.raises(DeployError, match="exists; pass --force"):
        write_triton_repo(source, tmp_path, max_batch_size=16)
    assert parsed(model_dir).max_batch_size == 4
    import gn_convert.deploy.triton_repo as repo

    def broken(*args, **kwargs):
        raise DeployError("config check failed")

    monkeypatch.setattr(repo, "check_model_dir", broken)
    with pytest.raises(DeployError, match="config check failed"):
        write_triton_repo(source, tmp_path, max_batch_size=16, force=True)
    assert parsed(model_dir).max_batch_size == 4  # the old model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18"]


def _tiny_onnx(path: Path, batch: int | str) -> Path:
    """A one-node model whose batch dimension is fixed (an int) or symbolic (a str)."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "tiny", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]), path)
    return path


@needs_serve
def test_fixed_batch_model_is_refused_unless_batching_is_off(tmp_path: Path) -> None:
    tiny = _tiny_onnx(tmp_path / "tiny.onnx", 1)
    with pytest.raises(DeployError, match="fixed batch dimension .*--max-batch-size 0"):
        write_triton_repo(tiny, tmp_path / "repo")
    config = parsed(write_triton_repo(tiny, tmp_path / "repo", max_batch_size=0))
    assert list(config.input[0].dims) == [1, 4] and config.name == "tiny"


@needs_serve
def test_external_data_is_copied_with_the_model(tmp_path: Path) -> None:
    weight = onnx.numpy_helper.from_array(np.arange(16, dtype=np.float32).reshape(4, 4), "w")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "w"], ["y"])], "ext", [x], [y], [weight])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.bin", size_threshold=0)
    model_dir = write_triton_repo(tmp_path / "ext.onnx", tmp_path / "repo")
    assert (model_dir / "1" / "ext.bin").read_bytes() == (tmp_path / "ext.bin").read_bytes()
    inputs = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(run_model(model_dir / "1" / "model.onnx", inputs), inputs @ np.arange(16.0).reshape(4, 4))
    (tmp_path / "ext.bin").unlink()
    with pytest.raises(DeployError, match="which is missing"):
        write_triton_repo(tmp_path / "ext.onnx", tmp_path / "repo", name="again")
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["ext"]


def test_model_io_reads_names_types_and_symbolic_dims(tmp_path: Path) -> None:
    io = read_model_io(_tiny_onnx(tmp_path / "tiny.onnx", "n"))
    assert [(t.name, t.datatype, t.shape) for t in (*io.inputs, *io.outputs)] == [
        ("x", "FP32", (None, 4)), ("y", "FP32", (None, 4))]
    assert io.batch_dynamic() and io.inputs[0].dims(batched=True) == [4]
    with pytest.raises(DeployError, match="not a file"):
        read_model_io(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(DeployError, match="cannot read .* as ONNX"):
        read_model_io(tmp_path / "junk.onnx")


def test_missing_serve_extra_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tritonclient.grpc.model_config_pb2", None)
    with pytest.raises(ServeExtraMissingError, match=r"pip install 'gn-convert\[serve\]'"):
        write_triton_repo(_tiny_onnx(tmp_path / "tiny.onnx", "n"), tmp_path / "repo")
    assert not (tmp_path / "repo" / "tiny").exists()


def test_missing_serve_extra_stops_serve_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "pytriton.triton", None)
    with pytest.raises(ServeExtraMissingError, match=r"serving a model needs the serve extra"):
        TritonModelServer(_tiny_onnx(tmp_path / "tiny.onnx", "n"))
    assert main(["serve", str(tmp_path / "tiny.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gn-convert: error: serving a model needs the serve extra (pytriton.triton is not "
                   "installed); run: pip install 'gn-convert[serve]'"]


def test_categories_are_found_in_the_checkpoint_beside_the_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"format": "gn-convert/1", "categories": ["cat", "dog"]}))
    assert labels_beside(tmp_path / "model.onnx") == ["cat", "dog"]
    assert labels_beside(tmp_path / "sub" / "model.onnx") is None


@needs_serve
def test_cli_deploy_writes_repo_and_reports_bad_input(tmp_path: Path, capsys, exports) -> None:
    source = exports.exported("resnet18").path
    assert main(["deploy", str(source), "--triton-repo", str(tmp_path), "--name", "r18",
                 "--max-batch-size", "2", "--instances", "3"]) == 0
    config = parsed(tmp_path / "r18")
    assert (config.max_batch_size, config.instance_group[0].count) == (2, 3)
    assert "wrote" in capsys.readouterr().out
    assert main(["deploy", str(source), "--triton-repo", str(tmp_path), "--name", "r18"]) == 2
    exists = capsys.readouterr().err.strip()
    assert exists.startswith("gn-convert: error:") and "exists; pass --force" in exists
    assert "--name" in exists and "--out" not in exists  # the options of this command, not the main one's
    assert main(["deploy", str(tmp_path / "none.onnx"), "--triton-repo", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gn-convert: error:")


@needs_serve
def test_unwritable_repository_is_an_output_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError):
        write_triton_repo(_tiny_onnx(tmp_path / "tiny.onnx", "n"), tmp_path / "file" / "repo")


def _options(repo: Path | None, out: Path, **overrides) -> PipelineOptions:
    return PipelineOptions("resnet18", weights="none", out=out, triton_repo=repo, **overrides)


@needs_serve
def test_pipeline_stage_writes_model_with_the_weights_categories(tmp_path: Path, exports) -> None:
    staged = tmp_path / ".gn-resnet18.partial"
    staged.mkdir()
    shutil.copy(exports.exported("resnet18").path, staged / "model.onnx")
    out = tmp_path / "gn-resnet18"
    opts = _options(tmp_path / "repo", out)
    assert check_options(opts) == (out, None)
    categories = [f"class {i}" for i in range(1000)]
    fields = _deploy_stage(opts, staged, out, CLASSIFICATION, categories, Stages(), False, None)
    model_dir = tmp_path / "repo" / "gn-resnet18"
    assert fields == {"triton": {"model_dir": str(model_dir), "name": "gn-resnet18", "instance": "cpu",
                                 "labels": True, "native_ops": None}}
    assert (model_dir / "labels.txt").read_text().splitlines() == categories
    assert [t.name for t in parsed(model_dir).input] == ["input"]
    with pytest.raises(OutputError, match="exists; pass --force.*--triton-name"):
        check_options(opts)
    with pytest.raises(OptionError, match="drop --no-onnx"):
        check_options(_options(tmp_path / "r2", out, onnx=False))
    assert _deploy_stage(_options(None, out), staged, out, CLASSIFICATION, None, Stages(), False, None) == {}


@needs_serve
def test_pipeline_stage_does_not_deploy_a_model_that_failed_parity(tmp_path: Path, exports) -> None:
    staged, out = tmp_path / "staged", tmp_path / "gn-resnet18"
    staged.mkdir()
    shutil.copy2(exports.exported("resnet18").path, staged / "model.onnx")
    fields = _deploy_stage(_options(tmp_path / "repo", out), staged, out, CLASSIFICATION, None, Stages(), True, None)
    assert fields == {"triton": {"skipped": "parity failed", "name": "gn-resnet18"}}
    assert not (tmp_path / "repo").exists()


@needs_serve
def test_a_model_path_that_is_a_file_names_the_deploy_options(tmp_path: Path) -> None:
    """Defect: the message told a `gn-convert deploy` user to choose another --out, an option
    deploy does not have."""
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "tiny").write_text("not a folder")
    with pytest.raises(OutputError) as info:
        write_triton_repo(_tiny_onnx(tmp_path / "tiny.onnx", "n"), tmp_path / "repo", force=True)
    assert "choose another --triton-repo or --name" in str(info.value) and "--out" not in str(info.value)
    assert (tmp_path / "repo" / "tiny").read_text() == "not a folder"


@needs_serve
@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b", "model\n"])
def test_names_that_are_not_plain_folder_names_are_refused_and_the_repository_kept(
        name: str, tmp_path: Path, exports) -> None:
    """Defect: `deploy --name . --force` (or ..) replaced the whole repository: the pattern took
    '.', '..' and a trailing newline, and repo/'.' is the repository itself."""
    repo = tmp_path / "repo"
    write_triton_repo(exports.exported("resnet18").path, repo, name="other")
    with pytest.raises(DeployError, match="must be letters, digits"):
        write_triton_repo(exports.exported("resnet18").path, repo, name=name, force=True)
    assert sorted(p.name for p in repo.iterdir()) == ["other"] and (repo / "other" / "config.pbtxt").is_file()


@needs_serve
def test_cli_deploy_dot_name_and_main_command_dot_triton_name_leave_the_repository(
        tmp_path: Path, exports, error_line) -> None:
    repo = tmp_path / "repo"
    write_triton_repo(exports.exported("resnet18").path, repo, name="other")
    assert main(["deploy", str(exports.exported("resnet18").path), "--triton-repo", str(repo), "--name", ".",
                 "--force"]) == 2
    assert "model name '.' must be" in error_line()
    out = tmp_path / "gn"
    assert main(["resnet18", "--weights", "none", "--out", str(out), "--triton-repo", str(repo),
                 "--triton-name", "..", "--force"]) == 2  # refused before any work
    assert "model name '..' must be" in error_line()
    assert sorted(p.name for p in repo.iterdir()) == ["other"] and not out.exists()


def test_out_dot_force_never_replaces_the_current_folder(tmp_path: Path, monkeypatch, error_line) -> None:
    """Defect: `--out . --force` run inside a folder replaced its contents (a user's file was deleted)."""
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert main(["resnet18", "--weights", "none", "--no-onnx", "--out", ".", "--force"]) == 2
    assert "is the current folder or one above it" in error_line()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.csv").write_text("1,2")
    assert main(["resnet18", "--weights", "none", "--no-onnx", "--out", str(theirs), "--force"]) == 2
    assert "holds files gn-convert did not write" in error_line()
    assert (theirs / "data.csv").read_text() == "1,2"
