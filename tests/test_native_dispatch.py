"""One kernel library for every x86-64 CPU and every supported onnxruntime: the instruction-set
variants it chooses between at run time (kernel_dispatch.h) each compute the plain and the blocked op
to the same bounds, and it negotiates onnxruntime's C API (the lower of the runtime's and its headers'
version), calling no onnxruntime function newer than the floor it declares.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from gn_convert.native import PORTABLE_MARCH, build_library
from gn_convert.native import build as native_build
from gn_convert.native.build import MIN_API_VERSION, compiler, kernel_isa
from gn_convert.native.headers import api_version, find_headers, runtime_api_version
from helpers.onnx_cases import FP16_BOUND

VARIANTS = ("avx512", "avx2", "baseline")
"""Best first: a CPU runs the variant kernel_isa() reports and every one after it."""
NATIVE_MEAN1000_BOUND = 1e-4  # as tests/test_native.py
VARIANT_PROBE = """
import json, sys
import numpy as np, onnx, onnxruntime as ort
from gn_convert.native.build import kernel_isa
from gn_convert.runtime import open_session, session_options
from helpers.onnx_cases import inputs, one_node_model, reference

library, model = sys.argv[1], sys.argv[2]
errors = {"isa": kernel_isa(library)}
for name, dtype, onnx_type, mean in (("f32", np.float32, onnx.TensorProto.FLOAT, 1000.0),
                                     ("f16", np.float16, onnx.TensorProto.FLOAT16, 0.0)):
    shape = (2, 48, 9, 11)
    feeds = inputs(shape, mean, dtype)
    session = ort.InferenceSession(one_node_model(shape, 6, 1e-5, onnx_type).SerializeToString(),
                                   session_options(library=library), providers=["CPUExecutionProvider"])
    ref = reference(feeds, 6, 1e-5)
    got = session.run(None, feeds)[0].astype(np.float64)
    errors[name] = float(np.abs(got - ref).max() / np.abs(ref).max())
x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
blocked = open_session(model, library=library, blocked=True, cache=False).run(None, {"input": x})[0]
body = open_session(model).run(None, {"input": x})[0]
errors["blocked"] = float(np.abs(blocked - body).max() / np.abs(body).max())
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def portable(native_library: Path) -> Path:
    """The build the wheel ships: -march=x86-64-v2 with the AVX2 and AVX-512 variants (in the session's cache)."""
    return build_library(march=PORTABLE_MARCH)


@pytest.fixture(scope="module")
def se_net(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from helpers.blocked import export_small_se_net

    return export_small_se_net(tmp_path_factory.mktemp("dispatch") / "se.onnx")


@pytest.mark.parametrize("isa", VARIANTS)
def test_each_instruction_set_variant_computes_the_plain_and_blocked_op(portable: Path, se_net: Path,
                                                                        isa: str) -> None:
    best = kernel_isa(portable)
    if VARIANTS.index(isa) < VARIANTS.index(best):
        pytest.skip(f"this CPU runs {best} at best")
    env = {**os.environ, "GN_CONVERT_KERNEL_ISA": isa, "PYTHONPATH": str(Path(__file__).parent),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", VARIANT_PROBE, str(portable), str(se_net)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert errors["isa"] == isa
    assert errors["f32"] < NATIVE_MEAN1000_BOUND and errors["f16"] < FP16_BOUND and errors["blocked"] < 1e-4, errors


def test_an_unknown_or_unsupported_variant_asked_for_falls_back_to_the_best(portable: Path) -> None:
    script = "import sys; from gn_convert.native.build import kernel_isa; print(kernel_isa(sys.argv[1]))"
    best = kernel_isa(portable)
    for wanted in ("sse9", ""):
        done = subprocess.run([sys.executable, "-c", script, str(portable)], capture_output=True, text=True,
                              env={**os.environ, "GN_CONVERT_KERNEL_ISA": wanted}, timeout=120)
        assert done.stdout.strip() == best, done.stderr


def test_the_library_negotiates_the_lower_of_the_runtimes_and_its_headers_c_api(portable: Path) -> None:
    from gn_convert.runtime import session_options

    session_options(library=portable)  # onnxruntime registers it: RegisterCustomOps negotiates
    handle = ctypes.CDLL(str(portable))  # the same loaded library
    compiled = api_version(find_headers(fetch=False))
    assert handle.GnConvertCompiledApiVersion() == compiled
    assert handle.GnConvertOrtApiVersion() == min(runtime_api_version(), compiled)
    assert handle.GnConvertMinApiVersion() == MIN_API_VERSION <= min(runtime_api_version(), compiled)


UNCALLED = r"Ort::Custom::Tensor<.*>::DataRaw\(\) const|ConstValueImpl<.*>::GetTensorRawData\(\) const"
"""Functions of onnxruntime's C++ headers that the library holds but never runs: the lite API's input tensors'
``Data()`` (a virtual, instantiated with every ``Tensor<T>``) reads through GetTensorData (API 23); the kernels
read their inputs with ``gn_ort::input_data`` instead, and the sources call no ``.Data()``."""


def _ort_api_members(headers: Path) -> dict[int, tuple[str, int]]:
    """OrtApi's members by byte offset: (name, the onnxruntime minor version that added it), from the
    header's ``\\since Version 1.N`` notes (the struct only grows) and the compiler's own offsets."""
    text = (headers / "onnxruntime_c_api.h").read_text()
    start = text.index("struct OrtApi {")
    body = text[start:text.index("\n};", start)]
    pattern = (r"\\since Version 1\.(\d+)|ORT_API2_STATUS\(\s*(\w+)|\(\s*ORT_API_CALL\s*\*\s*(\w+)\s*\)"
               r"|ORT_CLASS_RELEASE2?\(\s*(\w+)\s*\)|ORT_API_T\(\s*[^,]+,\s*(\w+)")
    since, pending, members = 1, 0, []
    for match in re.finditer(pattern, body):
        if match.group(1):
            pending = int(match.group(1))
            continue
        since, pending = max(since, pending), 0
        release = f"Release{match.group(4)}" if match.group(4) else None
        members.append((match.group(2) or match.group(3) or release or match.group(5), since))
    program = headers.parent / "offsets.cc"
    program.write_text('#include <cstddef>\n#include <cstdio>\n#include "onnxruntime_c_api.h"\nint main() {\n'
                       + "".join(f'  printf("%zu\\n", offsetof(OrtApi, {name}));\n' for name, _ in members)
                       + '  printf("%zu\\n", sizeof(OrtApi));\n}\n')
    binary = program.with_suffix("")
    subprocess.run([compiler(), "-std=c++17", f"-I{headers}", str(program), "-o", str(binary)], check=True, timeout=300)
    offsets = [int(line) for line in subprocess.run([str(binary)], capture_output=True, text=True,
                                                     check=True).stdout.split()]
    assert offsets[-1] == 8 * len(members), "a member of OrtApi was not parsed"  # every pointer accounted for
    return dict(zip(offsets, members))


def test_the_library_calls_no_onnxruntime_function_newer_than_its_api_floor(portable: Path,
                                                                             tmp_path: Path) -> None:
    """Negotiating API N hands the library onnxruntime N's function table: a call to a function added
    after N would read past its end. Every indirect call in the machine code is matched to OrtApi."""
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (binutils)")
    headers = tmp_path / "include"
    shutil.copytree(find_headers(fetch=False), headers)
    members = _ort_api_members(headers)
    code = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(portable)], capture_output=True,
                          text=True, check=True, timeout=300).stdout
    called: set[tuple[str, int]] = set()
    function = ""
    for line in code.splitlines():
        label = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if label:
            function = label.group(1)
        target = re.search(r"(?:call|jmp)\s+\*0x([0-9a-f]+)\(%r\w+\)", line)
        if target and int(target.group(1), 16) in members and not re.search(UNCALLED, function):
            called.add(members[int(target.group(1), 16)])
    assert ("KernelContext_ParallelFor", 17) in called and ("GetTensorMutableData", 1) in called  # the parse works
    newest = max(called, key=lambda member: member[1])
    assert newest[1] <= MIN_API_VERSION, f"{newest[0]} needs onnxruntime 1.{newest[1]}; raise kMinApiVersion"
    assert newest[1] == MIN_API_VERSION, f"the floor could be 1.{newest[1]}: lower kMinApiVersion"
    sources = [Path(native_build.SOURCE), *native_build.HEADERS]
    assert not any(re.search(r"(\.|->)Data\(\)", path.read_text()) for path in sources)  # UNCALLED stays uncalled


def test_onnxruntime_here_is_at_least_the_librarys_floor() -> None:
    assert int(ort.__version__.split(".")[1]) >= MIN_API_VERSION
