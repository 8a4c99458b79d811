"""Serve an ONNX model over the Triton protocols (KServe v2, HTTP and gRPC) without containers.

A real ``tritonserver`` (shipped by the ``nvidia-pytriton`` wheel, Python backend) receives
the requests, validates them against the model's config, forms dynamic batches and hands
them to an onnxruntime session of the model in this process.

The Python backend's stub links ``libpython3.X.so.1.0``; where the system's copy is another
patch release than the running interpreter (seen: a pyenv 3.11.7 beside Debian's 3.11.2),
models fail to load. The server is therefore started with the running interpreter's own
library folder first on ``LD_LIBRARY_PATH``.
"""

from __future__ import annotations

import contextlib
import logging
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from numpy.typing import NDArray

from gn_convert.deploy.extra import require
from gn_convert.deploy.onnx_io import ModelIO, read_model_io
from gn_convert.deploy.ports import AUTO, busy_port, check_ports_free, find_free_port, free_ports
from gn_convert.deploy.triton_repo import NAME_PATTERN, default_name
from gn_convert.errors import DeployError, ServerError
from gn_convert.runtime import open_session

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LOG_TAIL_LINES = 15
PORT_ATTEMPTS = 3
"""Starts tried when a port chosen for a port-0 request is taken before the server binds it."""
__all__ = ["LOOPBACK", "TritonModelServer", "find_free_port", "serve_until_signal"]


def interpreter_libdir_first(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the running interpreter's library folder first on ``LD_LIBRARY_PATH``.

    pytriton's Python-backend stub links the system's ``libpython``; with the running
    interpreter's own library first, it gets the one that matches this standard library.
    Applied to the server process's environment only, never to this process's.
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname or not (Path(libdir) / soname).exists():
        log.warning("the interpreter has no shared libpython (%s in %s); the Triton Python backend "
                    "may fail to load models", soname, libdir)
        return env
    old = env.get("LD_LIBRARY_PATH")
    return {**env, "LD_LIBRARY_PATH": f"{libdir}:{old}" if old else libdir}


def _scope_server_env(triton: Any) -> None:
    """Make pytriton start its server process with :func:`interpreter_libdir_first` applied.

    pytriton builds the server's environment from ``os.environ`` in ``TritonServer._get_env``;
    wrapping that method on this one server instance leaves the process environment alone. The
    ``TritonServer`` is created only when the server runs (``Triton._initialize_server``), so
    that step is wrapped too.

    Raises:
        ServerError: this pytriton has no such methods to wrap (a version gn-convert does not know).
    """
    unknown = ServerError("this nvidia-pytriton has no TritonServer._get_env; install nvidia-pytriton<0.8")

    def scope(server: Any) -> None:
        base = getattr(server, "_get_env", None)
        if base is None:
            raise unknown
        server._get_env = lambda: interpreter_libdir_first(base())

    if getattr(triton, "_triton_server", None) is not None:
        scope(triton._triton_server)
        return
    initialize = getattr(triton, "_initialize_server", None)
    if initialize is None or not hasattr(triton, "_triton_server"):
        raise unknown

    def initialize_scoped() -> None:
        initialize()
        scope(triton._triton_server)

    triton._initialize_server = initialize_scoped


def make_infer_func(session: Any, io: ModelIO) -> Callable[..., dict[str, NDArray[Any]]]:
    """A pytriton inference callable: one onnxruntime run per batch Triton forms.

    Args:
        session: an ``onnxruntime.InferenceSession`` of the model.
        io: the model's inputs and outputs.

    Returns:
        The callable, decorated with ``pytriton.decorators.batch``.
    """
    batch = require("pytriton.decorators", "serving a model").batch
    input_names = [t.name for t in io.inputs]
    output_names = [t.name for t in io.outputs]

    def infer(**inputs: NDArray[Any]) -> dict[str, NDArray[Any]]:
        results = session.run(output_names, {n: inputs[n] for n in input_names})
        return dict(zip(output_names, results))

    batched: Callable[..., dict[str, NDArray[Any]]] = batch(infer)  # pytriton's decorator, applied untyped
    return batched


class TritonModelServer:
    """A Triton server that serves one ONNX model through onnxruntime in this process.

    Usage::

        with TritonModelServer("model.onnx", http_port=8000) as server:
            ...  # query server.http_url / server.grpc_url with tritonclient

    The server listens on loopback unless ``host`` says otherwise; ``/v2/health/live`` and
    ``/v2/health/ready`` answer on HTTP, and the same checks on gRPC. :meth:`stop` (also on
    leaving the with-block, and at interpreter exit) lets in-flight requests finish for up to
    ``exit_timeout_s`` seconds and ends the server process.

    Args:
        onnx_path: the exported model.
        name: the model name in the server; default the file's stem (its folder's name for
            ``model.onnx``).
        host: the address to bind (default loopback 127.0.0.1).
        http_port: the HTTP port (default 8000; 0: a free port chosen at :meth:`start`).
        grpc_port: the gRPC port (default ``http_port + 1``, or 0 when ``http_port`` is 0).
        metrics_port: the Prometheus metrics port (default ``http_port + 2``, or 0 likewise).
        max_batch_size: the largest batch dynamic batching forms (default 8; 0: no batching).
        queue_delay_us: how long a request waits for others to batch with, in microseconds.
        threads: onnxruntime intra-op threads (default 0: onnxruntime's choice).
        provider: the onnxruntime provider, ``cpu`` (default) or ``cuda`` (see :mod:`gn_convert.runtime`).
        native_ops: gn-convert's native GroupNorm kernel library (``gn-convert native``) to
            register in the session, or None (the op's function body runs).
        blocked: with ``native_ops``, whether gn-convert moves the GroupNorms onto onnxruntime's
            blocked layout (:func:`gn_convert.runtime.open_session`; False: the file as it is, as
            Triton's onnxruntime backend runs it).
        startup_timeout_s: seconds :meth:`start` waits for the server and model to be ready.
        exit_timeout_s: seconds :meth:`stop` lets in-flight requests finish.
        log_file: where the server's own log goes (default a temporary file, removed by
            :meth:`close`).

    Raises:
        DeployError: a bad option.
        SessionError: onnxruntime cannot load the model.
        ServeExtraMissingError: the serve extra is not installed.
    """

    def __init__(self, onnx_path: str | Path, *, name: str | None = None, host: str = LOOPBACK,
                 http_port: int = 8000, grpc_port: int | None = None, metrics_port: int | None = None,
                 max_batch_size: int = 8, queue_delay_us: int = 100, threads: int = 0,
                 provider: str = "cpu", native_ops: str | Path | None = None, blocked: bool | None = None,
                 startup_timeout_s: float = 60.0,
                 exit_timeout_s: int = 5, log_file: str | Path | None = None) -> None:
        self._triton_mod = require("pytriton.triton", "serving a model")
        require("tritonclient.http", "serving a model")
        self.onnx_path = Path(onnx_path)
        self.name = name or default_name(self.onnx_path)
        if not NAME_PATTERN.match(self.name):
            raise DeployError(f"model name {self.name!r} must use only letters, digits, '_', '.' and '-'")
        self.host = host
        self.http_port = http_port
        auto = http_port == AUTO
        self.grpc_port = grpc_port if grpc_port is not None else (AUTO if auto else http_port + 1)
        self.metrics_port = metrics_port if metrics_port is not None else (AUTO if auto else http_port + 2)
        self._requested = (self.http_port, self.grpc_port, self.metrics_port)
        self.max_batch_size = max_batch_size
        self.queue_delay_us = queue_delay_us
        self.startup_timeout_s = startup_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.io = read_model_io(self.onnx_path)
        if max_batch_size > 0 and not self.io.batch_dynamic():
            raise DeployError(f"{self.onnx_path} has a fixed batch dimension; export it with a dynamic "
                              "batch, or serve it with max_batch_size 0")
        self.native_ops = Path(native_ops) if native_ops is not None else None
        self.session = open_session(self.onnx_path, provider=provider, threads=threads, library=self.native_ops,
                                    blocked=blocked)
        self.uses_gpu = "CUDAExecutionProvider" in self.session.get_providers()
        self._tmp = tempfile.TemporaryDirectory(prefix="gn-convert-serve-")
        self.log_file = Path(log_file) if log_file else Path(self._tmp.name) / "tritonserver.log"
        self._triton: Any = None
        self._owner: threading.Thread | None = None
        self._failure: list[BaseException] = []
        self._stop_requested = threading.Event()

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint, as ``tritonclient.http`` takes it."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint, as ``tritonclient.grpc`` takes it."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def _client_host(self) -> str:
        return LOOPBACK if self.host in ("0.0.0.0", "") else self.host

    def _tensors(self, specs: Sequence[Any]) -> list[Any]:
        tensor = require("pytriton.model_config", "serving a model").Tensor
        batched = self.max_batch_size > 0
        return [tensor(name=t.name, dtype=t.numpy_dtype.type, shape=tuple(t.dims(batched))) for t in specs]

    def _build(self) -> Any:
        mc = require("pytriton.model_config", "serving a model")
        config = self._triton_mod.TritonConfig(
            http_address=self.host, http_port=self.http_port, grpc_address=self.host,
            grpc_port=self.grpc_port, metrics_address=self.host, metrics_port=self.metrics_port,
            exit_timeout_secs=self.exit_timeout_s, log_file=self.log_file, log_verbose=0,
            allow_gpu_metrics=self.uses_gpu)
        triton = self._triton_mod.Triton(config=config, workspace=Path(self._tmp.name) / "workspace")
        model_config = mc.ModelConfig(
            batching=self.max_batch_size > 0, max_batch_size=max(self.max_batch_size, 1),
            batcher=mc.DynamicBatcher(max_queue_delay_microseconds=self.queue_delay_us))
        triton.bind(model_name=self.name, infer_func=make_infer_func(self.session, self.io),
                    inputs=self._tensors(self.io.inputs), outputs=self._tensors(self.io.outputs),
                    config=model_config, strict=True)
        return triton

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server's log ("" when there is none yet)."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def is_ready(self) -> bool:
        """True when the server and the model answer ready on the HTTP endpoint."""
        http = require("tritonclient.http", "serving a model")
        try:
            with contextlib.closing(http.InferenceServerClient(self.http_url, connection_timeout=2.0,
                                                               network_timeout=2.0)) as client:
                return bool(client.is_server_ready() and client.is_model_ready(self.name))
        except Exception:  # connection refused, reset, timeout: not ready
            return False

    def is_alive(self) -> bool:
        """True while the server process and the model's proxy run."""
        return self._triton is not None and self._triton.is_alive()

    def start(self) -> TritonModelServer:
        """Start the server and wait, at most ``startup_timeout_s``, until the model is ready.

        The server process is started from a thread that lives as long as the server: the
        process is bound to its starting thread (it gets SIGTERM when that thread ends).

        Returns:
            The server itself.

        Raises:
            DeployError: a port is in use.
            ServerError: the server did not become ready in time, or exited (the message holds
                the end of its log); it is stopped again before raising.
        """
        if self._triton is not None:
            raise ServerError("the server is already started; stop it first")
        for attempt in range(PORT_ATTEMPTS):
            try:
                return self._start_once()
            except (DeployError, ServerError):
                raced = AUTO in self._requested and busy_port(self.host, self._ports()) is not None
                if not raced or attempt == PORT_ATTEMPTS - 1:
                    raise
                log.info("a port chosen for %s was taken before the server bound it; choosing others", self.name)
        raise AssertionError("unreachable")

    def _ports(self) -> dict[str, int]:
        return {"HTTP": self.http_port, "gRPC": self.grpc_port, "metrics": self.metrics_port}

    def _start_once(self) -> TritonModelServer:
        """One start on the requested ports, the ones asked as 0 chosen afresh."""
        chosen = iter(free_ports(self.host, self._requested.count(AUTO)))
        self.http_port, self.grpc_port, self.metrics_port = (next(chosen) if port == AUTO else port
                                                             for port in self._requested)
        check_ports_free(self.host, self._ports())
        started = time.monotonic()
        self._failure = []
        self._stop_requested = threading.Event()
        self._triton = self._build()
        _scope_server_env(self._triton)
        self._owner = threading.Thread(target=self._own, args=(self._triton,),
                                       name=f"triton-{self.name}", daemon=True)
        self._owner.start()
        while not self._failure and time.monotonic() - started < self.startup_timeout_s:
            if self.is_ready():
                log.info("serving %s on http://%s grpc://%s (ready in %.1f s)", self.name,
                         self.http_url, self.grpc_url, time.monotonic() - started)
                return self
            time.sleep(0.2)
        failure = self._failure[0] if self._failure else None
        reason = f"{type(failure).__name__}: {failure}" if failure else \
            f"not ready after {self.startup_timeout_s:.0f} s"
        tail = self.log_tail()
        self.stop()
        raise ServerError(f"the Triton server did not start ({reason}); its log ends:\n{tail}")

    def _own(self, triton: Any) -> None:
        """Owner thread: start the server process, keep it until a stop is requested."""
        try:
            triton.run()
        except BaseException as err:  # reported by start()
            self._failure.append(err)
            return
        self._stop_requested.wait()

    def stop(self) -> None:
        """Stop the server (in-flight requests get ``exit_timeout_s`` to finish); safe to repeat."""
        triton, self._triton = self._triton, None
        if triton is None:
            return
        triton.stop()  # SIGINT, then waits for the process; the owner thread ends afterwards
        self._stop_requested.set()
        if self._owner is not None:
            self._owner.join(timeout=5.0)
        log.info("stopped the Triton server of %s", self.name)

    def close(self) -> None:
        """Stop the server and remove its temporary files."""
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> TritonModelServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def serve_until_signal(server: TritonModelServer, poll_s: float = 1.0,
                       on_ready: Callable[[], None] | None = None) -> int:
    """Start ``server`` and serve until SIGINT or SIGTERM, then stop it gracefully.

    Must be called from the main thread (signal handlers are installed there and restored
    afterwards).

    Args:
        server: a server that is not started yet.
        poll_s: how often to check that the server is still alive, in seconds.
        on_ready: called once the model is ready (the CLI prints the endpoints there).

    Returns:
        The signal number that ended serving, or 0 when the server exited by itself.

    Raises:
        ServerError: the server did not start.
    """
    import signal

    received = threading.Event()
    number = [0]

    def on_signal(signum: int, frame: Any) -> None:
        number[0] = signum
        received.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        if on_ready is not None:
            on_ready()
        while not received.wait(poll_s):
            if not server.is_alive():
                log.error("the Triton server exited; its log ends:\n%s", server.log_tail())
                break
        return number[0]
    finally:
        server.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
