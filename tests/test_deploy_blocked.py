"""``deploy --native-ops --blocked``: the model rewritten for this CPU family's blocked layout, shipped with
the kernel library, its target recorded in the model's metadata and the config's comments, checked as the
server runs it; a target block this machine cannot write is refused; nothing is written on failure; a
model folder whose model was written for another block is refused when it is opened (``serve REPO/NAME``).
The served answer against local onnxruntime is in tests/test_serve.py (a real server: slow).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from torch import nn

from gn_convert.cli import main
from gn_convert.deploy import DeployError, check_model_dir, write_triton_repo
from gn_convert.deploy.blocked_target import FAMILIES, TARGET_BLOCKS
from gn_convert.native import nchwc
from gn_convert.onnx import export_onnx
from gn_convert.runtime import open_session
from helpers.blocked import with_block
from helpers.triton import parsed

pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed")
BLOCK = nchwc.block_size()
OTHER = 8 if BLOCK == 16 else 16
pytestmark = pytest.mark.skipif(BLOCK not in (8, 16), reason=f"onnxruntime has no NCHWc layout on this CPU (block {BLOCK})")


@pytest.fixture(scope="module")
def source(exports) -> Path:
    return exports.exported("resnet18").path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, source: Path, native_library: Path) -> Path:
    return write_triton_repo(source, tmp_path_factory.mktemp("repo"), name="r18b", native_ops=native_library,
                             blocked=True)


def test_the_blocked_model_is_shipped_with_its_target_in_metadata_and_config_comments(
        model_dir: Path, source: Path, native_library: Path, exports) -> None:
    text = (model_dir / "config.pbtxt").read_text()
    head = text.splitlines()[:4]
    assert head[0] == (f"# gn-convert blocked layout: block {BLOCK}, onnxruntime {ort.__version__}, kernel library "
                       "-march=native")
    assert FAMILIES[BLOCK] in head[1] and all(line.startswith("# ") for line in head)
    config = parsed(model_dir)  # Triton's own parser: the comments are ignored
    assert list(config.model_operations.op_library_filename) == [f"/models/r18b/{native_library.name}"]
    assert config.max_batch_size == 8 and [t.name for t in config.input] == ["input"]
    shipped = onnx.load(str(model_dir / "1" / "model.onnx"))
    meta = {p.key: p.value for p in shipped.metadata_props}
    assert meta[nchwc.BLOCK_KEY] == str(BLOCK) and meta[nchwc.ONNXRUNTIME_KEY] == ort.__version__
    assert sum(n.op_type == nchwc.FUSED_OP for n in shipped.graph.node) >= 10
    assert not any(n.op_type == "GroupNorm" for n in shipped.graph.node)
    check_model_dir(model_dir)
    x = exports.crops(3).numpy()  # the shipped file with the shipped library, against the model without any
    got = open_session(model_dir / "1" / "model.onnx", library=model_dir / native_library.name,
                       blocked=False).run(None, {"input": x})[0]
    want = open_session(source).run(None, {"input": x})[0]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_a_target_block_this_machine_cannot_write_is_refused_and_nothing_is_written(
        source: Path, native_library: Path, tmp_path: Path, error_line) -> None:
    with pytest.raises(DeployError, match=rf"the blocked model for block {OTHER} \(.*\) can only be written on such "
                                          rf"a CPU .* this one's block is {BLOCK}\): run `gn-convert deploy"):
        write_triton_repo(source, tmp_path, name="m", native_ops=native_library, blocked=True, target_block=OTHER)
    assert not any(tmp_path.iterdir())
    base = ["deploy", str(source), "--triton-repo", str(tmp_path), "--native-library", str(native_library)]
    assert main([*base, "--native-ops", "--blocked", "--target-block", str(OTHER)]) == 2
    assert "on a machine of the target family" in error_line()
    assert main([*base, "--blocked"]) == 2  # --native-library without --native-ops is refused first
    assert "add --native-ops" in error_line()
    assert main(["deploy", str(source), "--triton-repo", str(tmp_path), "--blocked"]) == 2
    assert "the native kernel that runs it; add --native-ops" in error_line()
    assert main([*base, "--native-ops", "--target-block", str(BLOCK)]) == 2
    assert "add --blocked" in error_line()
    assert not any(tmp_path.iterdir())


def test_the_cli_writes_the_blocked_model_for_this_machines_block(source: Path, native_library: Path,
                                                                  tmp_path: Path, capsys) -> None:
    assert main(["deploy", str(source), "--triton-repo", str(tmp_path), "--name", "m", "--native-ops",
                 "--native-library", str(native_library), "--blocked", "--target-block", str(BLOCK)]) == 0
    assert "the blocked-layout model for this CPU family" in capsys.readouterr().out
    assert (tmp_path / "m" / "config.pbtxt").read_text().startswith(f"# gn-convert blocked layout: block {BLOCK},")


def test_a_model_with_nothing_to_move_is_refused_and_nothing_is_written(native_library: Path, tmp_path: Path) -> None:
    plain = tmp_path / "bn.onnx"
    export_onnx(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval(), plain, input_shape=(1, 3, 16, 16),
                allow_batchnorm=True)
    with pytest.raises(DeployError, match="no GroupNorm of .* runs on onnxruntime's blocked layout .* without --blocked"):
        write_triton_repo(plain, tmp_path / "repo", name="bn", native_ops=native_library, blocked=True)
    assert not (tmp_path / "repo" / "bn").exists() and not list((tmp_path / "repo").glob(".*"))


def test_a_config_that_does_not_name_its_models_target_fails_the_check(model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "r18b"
    shutil.copytree(model_dir, copy)
    text = (copy / "config.pbtxt").read_text()
    (copy / "config.pbtxt").write_text("".join(line + "\n" for line in text.splitlines() if not line.startswith("#")))
    with pytest.raises(DeployError, match="holds a blocked model for block .* but its comments name none"):
        check_model_dir(copy)
    (copy / "config.pbtxt").write_text(text.replace(f"block {BLOCK},", f"block {OTHER},"))
    with pytest.raises(DeployError, match=f"but its comments name block {OTHER}"):
        check_model_dir(copy)
    (copy / "config.pbtxt").write_text(re.sub(r"model_operations \{[^}]*\}\n", "", text))
    with pytest.raises(DeployError, match="loads no kernel library"):
        check_model_dir(copy)


def test_serving_a_model_folder_written_for_another_block_is_one_line_and_exit_2(
        model_dir: Path, tmp_path: Path, error_line) -> None:
    """What a server of the wrong CPU family does with the folder: its kernels refuse to be created."""
    pytest.importorskip("pytriton.triton", reason="the serve extra is not installed")
    wrong = tmp_path / "r18b"
    shutil.copytree(model_dir, wrong)
    model = wrong / "1" / "model.onnx"
    model.write_bytes(with_block(model.read_bytes(), OTHER))
    text = (wrong / "config.pbtxt").read_text()
    (wrong / "config.pbtxt").write_text(text.replace(f"block {BLOCK},", f"block {OTHER},", 1))
    assert main(["serve", str(wrong), "--port", "0"]) == 2
    line = error_line()
    assert f"this model was written for onnxruntime's blocked layout with block {OTHER}; this CPU's block is {BLOCK}" \
        in line and "rewrite it here" in line


def test_serve_takes_a_model_folders_settings_from_its_config(model_dir: Path, error_line) -> None:
    pytest.importorskip("pytriton.triton", reason="the serve extra is not installed")
    assert main(["serve", str(model_dir), "--max-batch-size", "4", "--native"]) == 2
    assert "--max-batch-size, --native: a model folder's name, batching and kernel library come from" in error_line()


def test_the_cli_offers_the_apis_target_blocks() -> None:
    from gn_convert.cli.deploy import TARGET_BLOCKS as CLI_BLOCKS

    assert CLI_BLOCKS == TARGET_BLOCKS == (8, 16)
