"""A blocked-layout model can only run on a CPU of the block it was written for: the kernels derive this
CPU's block as onnxruntime's MLAS does (gn_convert/native/nchwc_block.h) and refuse, when onnxruntime
creates them, a model whose ``block`` attribute differs, with one line; the model's metadata says what
it is valid for.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from gn_convert.errors import SessionError
from gn_convert.native import nchwc
from gn_convert.native.build import library_target
from gn_convert.runtime import open_session
from helpers.blocked import export_small_se_net, with_block

BLOCK = nchwc.block_size()
OTHER = 8 if BLOCK == 16 else 16
pytestmark = pytest.mark.skipif(BLOCK not in (8, 16), reason=f"onnxruntime has no NCHWc layout on this CPU (block {BLOCK})")


def refusal(op: str) -> str:
    return (f"{op}: this model was written for onnxruntime's blocked layout with block {OTHER}; this CPU's block is "
            f"{BLOCK}: rewrite it here with `gn-convert native --blocked` or deploy the plain model")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_small_se_net(tmp_path_factory.mktemp("block") / "se.onnx")


@pytest.fixture(scope="module")
def blocked(model: Path, native_library: Path) -> bytes:
    data, fused = nchwc.nchwc_model(model, native_library)
    assert fused == 2
    return data


def test_the_kernels_block_is_the_one_onnxruntime_pads_to(native_library: Path) -> None:
    """The C++ derivation (CPUID and XCR0, as MLAS) agrees with the block measured through onnxruntime."""
    assert ctypes.CDLL(str(native_library)).GnConvertNchwcBlockSize() == BLOCK


def test_the_blocked_model_records_what_it_is_valid_for(blocked: bytes, native_library: Path) -> None:
    meta = {p.key: p.value for p in onnx.load_from_string(blocked).metadata_props}
    assert meta[nchwc.BLOCK_KEY] == str(BLOCK) and meta[nchwc.LAYOUT_KEY].startswith(f"nchwc{BLOCK} ")
    assert meta[nchwc.ONNXRUNTIME_KEY] == ort.__version__
    assert meta[nchwc.LIBRARY_TARGET_KEY] == library_target(native_library) == "-march=native"
    assert meta[nchwc.WRITTEN_ON_KEY] and "\n" not in meta[nchwc.WRITTEN_ON_KEY]
    assert meta["gn_convert.target"] == "function"  # the export's own metadata is kept
    blocks = {helper_attr(n, "block") for n in onnx.load_from_string(blocked).graph.node if n.domain == nchwc.OP_DOMAIN}
    assert blocks == {BLOCK}


def helper_attr(node: onnx.NodeProto, name: str) -> int:
    return int(next(a.i for a in node.attribute if a.name == name))


@pytest.mark.parametrize("op", [nchwc.FUSED_OP, "ScaleNchwc"])
@pytest.mark.parametrize("blocked_option", [False, None, True])
def test_a_model_written_for_another_block_is_refused_with_one_line(blocked: bytes, native_library: Path, op: str,
                                                                    blocked_option: bool | None) -> None:
    """Never numbers: each blocked kernel checks its own attribute when onnxruntime creates it."""
    wrong = with_block(blocked, OTHER, ops=(op,))
    with pytest.raises(SessionError) as info:
        open_session(wrong, library=native_library, blocked=blocked_option)
    assert str(info.value) == f"cannot open the model: {refusal(op)}"  # also where the rewrite was required


def test_the_model_for_this_block_still_runs(blocked: bytes, model: Path, native_library: Path) -> None:
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    got = open_session(blocked, library=native_library, blocked=False).run(None, {"input": x})[0]
    want = open_session(model).run(None, {"input": x})[0]  # the function body, no library
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4


def test_cli_serve_refuses_a_model_for_another_block_with_exit_2(blocked: bytes, native_library: Path,
                                                                  tmp_path: Path, error_line) -> None:
    pytest.importorskip("pytriton.triton", reason="the serve extra is not installed")
    from gn_convert.cli import main

    wrong = tmp_path / "wrong.onnx"
    wrong.write_bytes(with_block(blocked, OTHER))
    assert main(["serve", str(wrong), "--native", "--native-library", str(native_library), "--port", "0"]) == 2
    line = error_line()
    assert re.search(r"(GroupNormNchwc|ScaleNchwc): this model was written for onnxruntime's blocked layout with "
                     rf"block {OTHER}; this CPU's block is {BLOCK}", line), line
