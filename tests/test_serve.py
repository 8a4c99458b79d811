"""A real Triton server (nvidia-pytriton's tritonserver) serving our exported model.

One server is started per module on free loopback ports, with a bounded start-up time, and is
always stopped by the fixture's finaliser, pass or fail; tests that stop a server start their
own. Outputs are compared with a local onnxruntime session of the same file on the same inputs.
Every test here starts or talks to a server: the module is marked slow.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from gn_convert.deploy import DeployError, TritonModelServer
from gn_convert.testing.photos import photo_crops
from helpers.models import SIZE
from helpers.triton import STARTUP_TIMEOUT_S, client, infer

try:
    import pytriton.triton  # noqa: F401
    import tritonclient.grpc  # noqa: F401 (the gRPC client: skip the module without it)
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
except ImportError as err:
    pytest.skip(f"the serve extra is not installed ({err.name}); pip install 'gn-convert[serve]'",
                allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_path(exports) -> Path:
    return exports.exported("resnet18").path


@pytest.fixture(scope="module")
def local(model_path: Path) -> Any:
    """The reference: a local onnxruntime session of the same file."""
    return ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def server(model_path: Path) -> Iterator[TritonModelServer]:
    server = TritonModelServer(model_path, name="resnet18", http_port=0, max_batch_size=8,
                               startup_timeout_s=STARTUP_TIMEOUT_S)
    try:
        yield server.start()
    finally:
        server.close()


def reference(local: Any, x: np.ndarray) -> np.ndarray:
    return local.run(None, {"input": x})[0]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_outputs_equal_local_onnxruntime(server, local, protocol: str) -> None:
    crops = photo_crops(3, SIZE, seed=11).numpy()
    with client(server, protocol) as c:
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("resnet18")
        for x in (crops[:1], crops[1:2], crops):  # batch 1, and a batch of 3 in one request
            served = infer(c, protocol, x)
            assert served.shape == (len(x), 1000)
            np.testing.assert_array_equal(served, reference(local, x))


def test_model_config_reports_dynamic_batching(server) -> None:
    with client(server, "http") as c:
        config = c.get_model_config("resnet18")
    assert config["max_batch_size"] == 8 and "dynamic_batching" in config
    assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
        ("input", "TYPE_FP32", [3, SIZE, SIZE])]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case, message", [
    ("shape", "unexpected shape for input 'input'"),
    ("dtype", "data-type is 'FP64', but model 'resnet18' expects 'FP32'"),
    ("name", "unexpected inference input 'pixels'"),
])
def test_bad_request_gets_clear_error_and_server_keeps_serving(server, local, protocol: str, case: str,
                                                              message: str) -> None:
    x = photo_crops(1, SIZE, seed=12).numpy()
    bad = {"shape": (np.zeros((1, 3, 32, 32), np.float32), "input", "FP32"),
           "dtype": (x.astype(np.float64), "input", "FP64"),
           "name": (x, "pixels", "FP32")}[case]
    with client(server, protocol) as c:
        with pytest.raises(InferenceServerException, match=re.escape(message)):
            infer(c, protocol, bad[0], name=bad[1], datatype=bad[2])
        np.testing.assert_array_equal(infer(c, protocol, x), reference(local, x))
        assert c.is_server_ready()


def test_concurrent_clients_every_response_matches_its_request(server, local) -> None:
    threads, per_thread = 4, 6
    inputs = photo_crops(threads * per_thread, SIZE, seed=13).numpy()
    expected = [reference(local, inputs[i:i + 1]) for i in range(len(inputs))]

    def worker(t: int) -> list[tuple[int, np.ndarray]]:
        protocol = "http" if t % 2 == 0 else "grpc"
        with client(server, protocol) as c:
            return [(i, infer(c, protocol, inputs[i:i + 1])) for i in range(t, len(inputs), threads)]

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = [r for batch in pool.map(worker, range(threads)) for r in batch]
    seconds = time.perf_counter() - start
    assert sorted(i for i, _ in results) == list(range(len(inputs)))
    for i, served in results:  # batched with others by the server, still its own answer
        np.testing.assert_allclose(served, expected[i], rtol=0, atol=1e-5)
        assert served.argmax() == expected[i].argmax()
    print(f"{len(results)} requests from {threads} clients in {seconds:.2f} s "
          f"({len(results) / seconds:.1f} requests/s)")


def test_unloadable_model_is_refused_before_start(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07")  # a ModelProto with only ir_version
    with pytest.raises(DeployError, match="no graph inputs|cannot"):
        TritonModelServer(tmp_path / "junk.onnx")


def test_port_in_use_is_refused_before_start(model_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = TritonModelServer(model_path, http_port=0, grpc_port=port, metrics_port=0)
        try:
            with pytest.raises(DeployError, match=f"cannot listen on 127.0.0.1:{port} for gRPC"):
                server.start()
            assert not server.is_alive()
        finally:
            server.close()


def test_port_zero_asks_the_kernel_for_distinct_free_ports() -> None:
    from gn_convert.deploy.ports import free_ports

    ports = free_ports("127.0.0.1", 3)
    assert len(set(ports)) == 3 and 0 not in ports
    for port in ports:  # nothing listens on them
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_chosen_port_taken_before_the_server_binds_it_is_chosen_again(model_path: Path, monkeypatch) -> None:
    """The race of find-a-free-port-then-bind: another process takes the chosen port in between."""
    from gn_convert.deploy import server as server_module

    real = server_module.free_ports
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", 0))
        thief.listen()
        stolen = thief.getsockname()[1]
        calls: list[int] = []

        def racy(host: str, count: int) -> list[int]:
            calls.append(count)
            ports = real(host, count)
            return [stolen, *ports[1:]] if len(calls) == 1 else ports

        monkeypatch.setattr(server_module, "free_ports", racy)
        server = TritonModelServer(model_path, name="raced", http_port=0, startup_timeout_s=STARTUP_TIMEOUT_S)
        try:
            server.start()
            assert server.is_ready() and calls == [3, 3] and stolen not in (server.http_port, server.grpc_port)
        finally:
            server.close()


def test_cli_serve_stops_gracefully_on_sigterm(model_path: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; from gn_convert.cli import main; sys.exit(main())",
           "serve", str(model_path), "--name", "cli-model", "--port", "0",
           "--startup-timeout", str(STARTUP_TIMEOUT_S)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()  # printed once the model is ready
        assert line.startswith("serving cli-model:"), proc.stderr.read() if proc.poll() is not None else line
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", line).group(1))  # --port 0: the port it chose
        assert port != 0
        with contextlib.closing(httpclient.InferenceServerClient(f"127.0.0.1:{port}")) as c:
            assert c.is_model_ready("cli-model")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped on SIGTERM" in err
        with pytest.raises(ConnectionRefusedError):
            with contextlib.closing(httpclient.InferenceServerClient(f"127.0.0.1:{port}")) as c:
                c.is_server_live()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.cuda
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="no CUDAExecutionProvider here (needs a CUDA GPU and onnxruntime-gpu)")
def test_served_on_cuda_matches_a_local_cuda_session(model_path: Path) -> None:
    local_cuda = ort.InferenceSession(str(model_path), providers=["CUDAExecutionProvider"])
    x = photo_crops(2, SIZE, seed=14).numpy()
    with TritonModelServer(model_path, name="resnet18", http_port=0, provider="cuda",
                           startup_timeout_s=STARTUP_TIMEOUT_S) as cuda_server:
        assert cuda_server.uses_gpu
        with client(cuda_server, "grpc") as c:
            np.testing.assert_allclose(infer(c, "grpc", x), local_cuda.run(None, {"input": x})[0], rtol=0, atol=1e-5)


def _own_server(model_path: Path) -> TritonModelServer:
    return TritonModelServer(model_path, name="resnet18", http_port=0, startup_timeout_s=STARTUP_TIMEOUT_S)


def test_stop_ends_the_server_and_frees_its_ports(model_path: Path) -> None:
    """Its own server (stopping the shared one would depend on running last)."""
    server = _own_server(model_path)
    try:
        server.start()
        assert server.is_ready()
        server.stop()
        assert not server.is_alive() and not server.is_ready()
        with pytest.raises(ConnectionRefusedError):
            with client(server, "http") as c:
                c.is_server_live()
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            with client(server, "grpc") as c:
                c.is_server_live()
    finally:
        server.close()


def test_starting_a_server_leaves_this_process_environment_alone(model_path: Path, monkeypatch) -> None:
    """Defect: the server's LD_LIBRARY_PATH (the interpreter's libdir first, for the Python
    backend stub) was set in os.environ, for every later subprocess of this process."""
    import sysconfig

    from gn_convert.deploy.server import interpreter_libdir_first

    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/mine")
    before = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    assert interpreter_libdir_first({"LD_LIBRARY_PATH": "/opt/mine"})["LD_LIBRARY_PATH"] == f"{libdir}:/opt/mine"
    server = _own_server(model_path)
    try:
        server.start()  # the model loads only with the scoped library path
        assert dict(os.environ) == before
        server_env = server._triton._triton_server._get_env()
        assert server_env["LD_LIBRARY_PATH"].startswith(f"{libdir}:/opt/mine")
    finally:
        server.close()
    assert dict(os.environ) == before


def test_a_blocked_model_served_from_its_repository_equals_local_onnxruntime(model_path: Path, native_library: Path,
                                                                             tmp_path: Path) -> None:
    """``deploy --native-ops --blocked``'s folder served the way Triton's onnxruntime backend runs it (its
    model file, the library its config loads, onnxruntime's own optimisations), answered over HTTP and
    gRPC, against a local onnxruntime session of the same file with the same library."""
    from gn_convert.deploy import write_triton_repo
    from gn_convert.deploy.repo_server import server_for_model_dir
    from gn_convert.native.nchwc import block_size
    from gn_convert.runtime import open_session

    if block_size() not in (8, 16):
        pytest.skip(f"onnxruntime has no NCHWc layout on this CPU (block {block_size()})")
    model_dir = write_triton_repo(model_path, tmp_path / "repo", name="blocked", native_ops=native_library,
                                  blocked=True)
    shipped, library = model_dir / "1" / "model.onnx", model_dir / native_library.name
    local_blocked = open_session(shipped, library=library, blocked=False)
    plain = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = photo_crops(3, SIZE, seed=15).numpy()
    want = local_blocked.run(None, {"input": x})[0]
    server = server_for_model_dir(model_dir, http_port=0, startup_timeout_s=STARTUP_TIMEOUT_S)
    assert server.onnx_path == shipped and server.native_ops == library and server.max_batch_size == 8
    try:
        server.start()
        for protocol in ("http", "grpc"):
            with client(server, protocol) as c:
                for batch in (x[:1], x):
                    served = infer(c, protocol, batch, model="blocked")
                    error = float(np.abs(served - local_blocked.run(None, {"input": batch})[0]).max())
                    assert error <= 1e-5, (protocol, len(batch), error)
                    print(f"{protocol} batch {len(batch)}: served vs local blocked session max abs error {error:.1e}")
    finally:
        server.close()
    # and the blocked model is the model: against the original file without the library (the function body)
    reference = plain.run(None, {"input": x})[0]
    assert np.abs(want - reference).max() / np.abs(reference).max() < 1e-4
