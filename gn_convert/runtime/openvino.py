"""OpenVINO's CPU runtime, opened the way gn-convert opens onnxruntime: one session type for parity and latency.

This is the OpenVINO runtime itself (``pip install openvino``, or gn-convert's ``openvino`` extra), not
onnxruntime's OpenVINO execution provider. Two providers (:data:`OPENVINO_PRECISIONS`):

- ``openvino``: the CPU with ``INFERENCE_PRECISION_HINT=f32``, what a deployment that must match
  PyTorch sets;
- ``openvino-default``: the CPU at OpenVINO's default precision, bf16 on CPUs with AVX512-BF16 or AMX
  (f32 elsewhere), what a user who sets nothing gets.

Each runs in one of two shape modes (:data:`SHAPE_MODES`): ``dynamic`` compiles the file as it is (a
dynamic batch stays dynamic) and ``static`` reshapes the model to each input's shape before
compiling, as OpenVINO users fix shapes (one compiled model per shape). :class:`OpenVinoSession`
offers the part of onnxruntime's ``InferenceSession`` that gn-convert uses (``get_inputs``,
``get_outputs``, ``get_providers``, ``run``), so parity, the session comparison and the latency
harness take it unchanged.

An OpenVINO bug can kill the process while compiling (2026.4.1 segfaults on a static-shape
GroupNormalization in a residual block: ``scripts/openvino_segfault_repro.py``), so every compile is
first tried in a child process (``probe``): a crash there becomes a :class:`SessionError` naming the
signal, and this process stays up.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gn_convert.errors import ProviderUnavailableError, SessionError, first_line

OPENVINO_PRECISIONS: dict[str, str | None] = {"openvino": "f32", "openvino-default": None}
"""Short provider name -> OpenVINO's ``INFERENCE_PRECISION_HINT`` (None: OpenVINO's default)."""
SHAPE_MODES: tuple[str, ...] = ("dynamic", "static")
"""How a session compiles: the file's shapes, or the model reshaped to each input's shape."""
INSTALL = "pip install 'gn-convert[openvino]' (or pip install openvino)"
PROBE_TIMEOUT_S = 600.0
"""The longest a child process may take to compile a model (a large model compiles in tens of seconds)."""
_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "bf16": "tensor(bfloat16)", "f64": "tensor(double)",
          "i64": "tensor(int64)", "i32": "tensor(int32)", "u8": "tensor(uint8)", "boolean": "tensor(bool)"}
"""OpenVINO element type names -> onnxruntime's type strings (what callers compare against)."""


def openvino_version() -> str:
    """The installed OpenVINO's version.

    Raises:
        ProviderUnavailableError: openvino is not installed (the message says how to install it).
    """
    try:
        import openvino
    except ImportError as err:
        raise ProviderUnavailableError(f"openvino is not installed: {INSTALL}") from err
    return str(openvino.__version__).split("-")[0]


@dataclass(frozen=True)
class TensorInfo:
    """One input or output, as onnxruntime's ``NodeArg`` describes it (``name``, ``shape``, ``type``)."""

    name: str
    shape: list[int | str]
    type: str


def _config(precision: str | None, threads: int) -> dict[str, str]:
    """The compile properties: precision hint (when given) and CPU threads (when positive)."""
    config = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


def _probe(path: Path, shapes: dict[str, list[int]] | None, config: dict[str, str], what: str) -> None:
    """Compile ``path`` (reshaped to ``shapes``) in a child process first.

    Raises:
        SessionError: the child was killed by a signal (OpenVINO crashed compiling the model).
    """
    done = subprocess.run([sys.executable, "-m", "gn_convert.runtime.openvino", str(path), json.dumps(shapes),
                           json.dumps(config)], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        mode = f"reshaped to {shapes}" if shapes else "with the file's shapes"
        raise SessionError(f"OpenVINO {openvino_version()} crashed ({name}) compiling {what} {mode} (a crash in "
                           "OpenVINO itself; for GroupNorm models export --target openvino, which avoids the one "
                           "known: scripts/openvino_segfault_repro.py)")


class OpenVinoSession:
    """A model compiled by OpenVINO for its CPU, with the session interface of onnxruntime that gn-convert uses.

    Args:
        model: the ``.onnx`` file (its external data beside it) or serialised model bytes.
        precision: ``INFERENCE_PRECISION_HINT`` (``f32``), or None for OpenVINO's default.
        threads: ``INFERENCE_NUM_THREADS`` (0: OpenVINO's default, every core).
        static: compile one model per input shape, reshaped to it; else the file's shapes.
        probe: try every compile in a child process first (see the module docs).
        provider: the short provider name, for messages and ``get_providers``.
        properties: more compile properties (``{"NUM_STREAMS": "1"}``, ``{"SNIPPETS_MODE": "DISABLE"}``).

    Raises:
        ProviderUnavailableError: openvino is not installed.
        SessionError: the file is missing, OpenVINO cannot read or compile it, or crashed compiling it.
    """

    def __init__(self, model: str | Path | bytes, *, precision: str | None = "f32", threads: int = 0,
                 static: bool = False, probe: bool = True, provider: str = "openvino",
                 properties: dict[str, str] | None = None) -> None:
        openvino_version()
        import openvino as ov

        if not isinstance(model, bytes) and not Path(model).is_file():
            raise SessionError(f"ONNX file {model} not found")
        self.what = "the model" if isinstance(model, bytes) else str(model)
        self.config = {**_config(precision, threads), **(properties or {})}
        self.static, self.probe, self.provider = static, probe, provider
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if isinstance(model, bytes):
            self._tmp = tempfile.TemporaryDirectory(prefix="gn-convert-ov-")
            self.path = Path(self._tmp.name) / "model.onnx"
            self.path.write_bytes(model)
        else:
            self.path = Path(model)
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(self.path))
        except Exception as err:  # OpenVINO raises RuntimeError / OpConversionFailure with a long message
            raise SessionError(f"OpenVINO cannot read {self.what}: {first_line(err, 300)}") from err
        self._compiled: dict[tuple[tuple[int, ...], ...], Any] = {}
        self.inference_precision = precision or ""
        """The precision OpenVINO computes in (``f32``, ``bf16``), read from the compiled model once there is one."""
        if not static:
            self.compiled(None)

    def get_inputs(self) -> list[TensorInfo]:
        """The model's inputs (dynamic axes as ``"?"``)."""
        return [self._info(port) for port in self.model.inputs]

    def get_outputs(self) -> list[TensorInfo]:
        """The model's outputs."""
        return [self._info(port) for port in self.model.outputs]

    def get_providers(self) -> list[str]:
        """One entry naming the runtime, its device and precision (onnxruntime lists its providers here)."""
        return [f"OpenVINO {openvino_version()} CPU ({self.provider})"]

    def compiled(self, shapes: dict[str, Sequence[int]] | None) -> Any:
        """The compiled model for these input shapes (static mode) or the file's shapes (``None``); compiled once each.

        Raises:
            SessionError: OpenVINO cannot compile the model, or crashed compiling it (in the child process).
        """
        key = tuple(tuple(int(d) for d in shape) for shape in shapes.values()) if shapes else ()
        if key not in self._compiled:
            fixed = {name: [int(d) for d in shape] for name, shape in shapes.items()} if shapes else None
            if self.probe:
                _probe(self.path, fixed, self.config, self.what)
            model = self.model.clone()
            try:
                if fixed:
                    model.reshape(fixed)
                compiled = self.core.compile_model(model, "CPU", self.config)
            except Exception as err:  # OpenVINO's RuntimeError and its subclasses
                raise SessionError(f"OpenVINO cannot compile {self.what} on the CPU: {first_line(err, 300)}") from err
            self.inference_precision = str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
            self._compiled[key] = compiled
        return self._compiled[key]

    def request(self, feeds: dict[str, Any]) -> Any:
        """An infer request of the model compiled for ``feeds``' shapes (the file's shapes in dynamic mode)."""
        compiled = self.compiled({name: value.shape for name, value in feeds.items()} if self.static else None)
        return compiled.create_infer_request()

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, Any]) -> list[Any]:
        """Run the model on ``feeds`` (input name -> numpy array); its outputs in order, or those named.

        Raises:
            SessionError: OpenVINO failed to run the model.
        """
        request = self.request(feeds)
        try:
            results = request.infer(feeds)
        except Exception as err:  # OpenVINO's RuntimeError
            raise SessionError(f"OpenVINO failed to run {self.what}: {first_line(err, 300)}") from err
        by_name = {port.get_any_name(): results[port] for port in request.model_outputs}
        wanted = list(output_names) if output_names else [port.get_any_name() for port in self.model.outputs]
        return [by_name[name].copy() for name in wanted]

    @staticmethod
    def _info(port: Any) -> TensorInfo:
        shape: list[int | str] = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
        return TensorInfo(port.get_any_name(), shape, _TYPES.get(port.get_element_type().get_type_name(), "?"))


def open_openvino(model: str | Path | bytes, provider: str = "openvino", *, threads: int = 0,
                  shapes: str = "dynamic", probe: bool = True) -> OpenVinoSession:
    """An :class:`OpenVinoSession` for a short provider name and a shape mode.

    Args:
        model: the ``.onnx`` file or model bytes.
        provider: a key of :data:`OPENVINO_PRECISIONS`.
        threads: CPU threads (0: OpenVINO's default).
        shapes: a value of :data:`SHAPE_MODES`.
        probe: compile in a child process first.

    Raises:
        SessionError: an unknown provider or shape mode, or a model OpenVINO cannot read or compile.
        ProviderUnavailableError: openvino is not installed.
    """
    if provider not in OPENVINO_PRECISIONS:
        raise SessionError(f"unknown OpenVINO provider {provider!r}; choose one of {', '.join(OPENVINO_PRECISIONS)}")
    if shapes not in SHAPE_MODES:
        raise SessionError(f"unknown OpenVINO shape mode {shapes!r}; choose one of {', '.join(SHAPE_MODES)}")
    return OpenVinoSession(model, precision=OPENVINO_PRECISIONS[provider], threads=threads,
                           static=shapes == "static", probe=probe, provider=provider)


def _child(argv: list[str]) -> int:
    """The probe's child process: read, reshape (when given shapes) and compile; a crash ends it by a signal."""
    import openvino as ov

    path, shapes, config = argv[0], json.loads(argv[1]), json.loads(argv[2])
    core = ov.Core()
    model = core.read_model(path)
    if shapes:
        model.reshape(shapes)
    core.compile_model(model, "CPU", config)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
