"""What the latency benchmark times: onnxruntime sessions and torch modules, as variants.

- :func:`ort_session`: an onnxruntime session set up for timing (:func:`gn_convert.runtime.open_session`).
- :func:`session_variant`, :func:`openvino_variant`, :func:`torch_variant`: the
  :class:`~gn_convert.bench.harness.Variant` of each (onnxruntime, OpenVINO, torch), timed by
  :func:`gn_convert.bench.harness.run_bench`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gn_convert.bench.harness import Call, Variant
from gn_convert.errors import BenchError
from gn_convert.runtime import open_session

DEFAULT_SPATIAL = 224
"""Spatial size used when a model's input has symbolic spatial dimensions."""


def ort_session(path: str | Path, *, threads: int, provider: str = "cpu",
                disabled_optimizers: Sequence[str] = (), custom_ops_library: str | Path | None = None,
                spinning: bool = False, blocked: bool | None = None) -> Any:
    """An onnxruntime session for timing: all optimisations, sequential execution, spinning off.

    Args:
        path: the ``.onnx`` file (its external data beside it).
        threads: intra-op threads.
        provider: ``cpu`` or ``cuda``.
        disabled_optimizers: onnxruntime graph transformers to switch off (``NchwcTransformer``).
        custom_ops_library: the native kernel library to register.
        spinning: let idle pool threads spin (onnxruntime's default). Off by default here: the
            threads of one session keep spinning after its run and steal the cores from the
            next session timed, which biases interleaved measurements.
        blocked: with ``custom_ops_library``, whether GroupNorm runs on onnxruntime's blocked layout
            (see :func:`gn_convert.runtime.open_session`).

    Raises:
        SessionError: the file is missing or onnxruntime cannot load it.
        ProviderUnavailableError: the provider is not present.
    """
    if provider not in ("cpu", "cuda"):
        raise BenchError(f"unknown provider {provider!r}; choose cpu or cuda")
    return open_session(path, provider=provider, threads=threads, spinning=spinning,
                        library=custom_ops_library, disabled_optimizers=disabled_optimizers, blocked=blocked)


def session_input_shape(session: Any, fallback: Sequence[int] | None = None) -> tuple[int, ...]:
    """One sample's shape (C, H, W, ...) from a session's first input.

    Symbolic dimensions other than the batch take ``fallback``'s value, or 224.

    Raises:
        BenchError: when the input has rank below 3.
    """
    dims = session.get_inputs()[0].shape
    if len(dims) < 3:
        raise BenchError(f"the model's input has rank {len(dims)}; bench needs (N, C, H, ...) images")
    shape = []
    for k, dim in enumerate(dims[1:]):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif fallback is not None and len(fallback) == len(dims) - 1:
            shape.append(int(fallback[k]))
        else:
            shape.append(DEFAULT_SPATIAL)
    return tuple(shape)


def session_variant(name: str, session: Any, note: str = "") -> Variant:
    """A variant that runs an onnxruntime session.

    On the CPU provider the input is passed as a numpy array (no copy is timed beyond
    onnxruntime's own). On CUDA the input is copied to the device once and the output is
    bound on the device, so only the model runs in the timed call. Inputs are cast to the
    session's input type (float16 models get float16 inputs).
    """
    def prepare(batch: np.ndarray) -> Call:
        inp = session.get_inputs()[0]
        data = batch.astype(np.float16 if inp.type == "tensor(float16)" else np.float32)
        if "CUDAExecutionProvider" not in session.get_providers():
            feeds = {inp.name: data}
            return lambda: session.run(None, feeds)
        import onnxruntime as ort

        binding = session.io_binding()
        binding.bind_ortvalue_input(inp.name, ort.OrtValue.ortvalue_from_numpy(data, "cuda", 0))
        for out in session.get_outputs():
            binding.bind_output(out.name, "cuda")

        def call() -> None:
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
        return call

    return Variant(name, prepare, note)


def openvino_variant(name: str, session: Any, note: str = "") -> Variant:
    """A variant that runs an OpenVINO CPU session (:class:`gn_convert.runtime.openvino.OpenVinoSession`).

    The input is set on the infer request once, so only the inference is timed (in static mode the
    model compiled for that batch's shape).
    """
    def prepare(batch: np.ndarray) -> Call:
        import openvino as ov

        inp = session.get_inputs()[0]
        request = session.request({inp.name: batch})
        request.set_input_tensor(ov.Tensor(np.ascontiguousarray(batch, dtype=np.float32)))
        return lambda: request.infer()

    return Variant(name, prepare, note)


def torch_variant(name: str, model: Any, *, threads: int, device: str = "cpu", fp16: bool = False,
                  note: str = "") -> Variant:
    """A variant that runs a torch module eagerly (a reference, not a deployment path).

    Args:
        name: the row label.
        model: an ``nn.Module``; it is put in eval mode (and moved to ``device``).
        threads: torch's intra-op threads while the variant runs (restored after each call, so
            the rest of the process keeps its own setting).
        device: ``cpu`` or ``cuda``.
        fp16: run in half precision.
        note: description under the table.
    """
    import torch

    model = model.eval().to(device=device, dtype=torch.float16 if fp16 else torch.float32)

    def prepare(batch: np.ndarray) -> Call:
        x = torch.from_numpy(batch).to(device=device, dtype=torch.float16 if fp16 else torch.float32)

        def call() -> object:
            previous = torch.get_num_threads()
            if previous != threads:
                torch.set_num_threads(threads)
            try:
                with torch.inference_mode():
                    out = model(x)
                if device != "cpu":
                    torch.cuda.synchronize()
            finally:
                if previous != threads:
                    torch.set_num_threads(previous)
            return out
        return call

    return Variant(name, prepare, note)
