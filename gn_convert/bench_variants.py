"""What the latency benchmark times: onnxruntime sessions and torch modules, as variants.

- :func:`ort_session`: an onnxruntime session on the CPU or CUDA provider, thread count set.
- :func:`session_variant`, :func:`torch_variant`: the :class:`~gn_convert.bench.Variant` of
  each, timed by :func:`gn_convert.bench.run_bench`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .bench import PROVIDERS, BenchError, Call, ProviderUnavailableError, Variant

DEFAULT_SPATIAL = 224
"""Spatial size used when a model's input has symbolic spatial dimensions."""


def check_provider(provider: str) -> str:
    """Return onnxruntime's provider name for ``cpu`` or ``cuda``.

    Raises:
        BenchError: for an unknown name.
        ProviderUnavailableError: when this onnxruntime build lacks the provider.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise BenchError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise ProviderUnavailableError(
            f"{name} is not available in this onnxruntime build ({ort.__version__}, providers: "
            f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a machine with a GPU")
    return name


def ort_session(path: str | Path, *, threads: int, provider: str = "cpu",
                disabled_optimizers: Sequence[str] = (), custom_ops_library: str | Path | None = None,
                spinning: bool = False) -> Any:
    """Open an onnxruntime session for timing.

    Args:
        path: the ``.onnx`` file (its external data beside it).
        threads: intra-op threads (inter-op execution is sequential).
        provider: ``cpu`` or ``cuda`` (CUDA sessions fall back to the CPU for unsupported ops).
        disabled_optimizers: names of onnxruntime graph transformers to switch off
            (``NchwcTransformer``), for experiments.
        custom_ops_library: a shared library registered with ``register_custom_ops_library``.
        spinning: let idle pool threads spin (onnxruntime's default). Off by default here: the
            threads of one session keep spinning after its run and steal the cores from the
            next session timed, which biases interleaved measurements.

    Returns:
        An ``onnxruntime.InferenceSession`` with all graph optimisations enabled.

    Raises:
        BenchError: the file is missing or onnxruntime cannot load it.
        ProviderUnavailableError: the provider is not present.
    """
    import onnxruntime as ort

    providers = [check_provider(provider)] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"ONNX file {path} not found")
    if custom_ops_library is not None:  # a library onnxruntime refuses is one clear line
        from .native import session_options

        options = session_options(custom_ops_library)
    else:
        options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=providers,
                                    disabled_optimizers=list(disabled_optimizers) or None)
    except Exception as exc:  # onnxruntime raises several private types; the message matters
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise BenchError(f"onnxruntime cannot load {path}: {first}") from None


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


def torch_variant(name: str, model: Any, *, threads: int, device: str = "cpu", fp16: bool = False,
                  note: str = "") -> Variant:
    """A variant that runs a torch module eagerly (a reference, not a deployment path).

    Args:
        name: the row label.
        model: an ``nn.Module``; it is put in eval mode (and moved to ``device``).
        threads: torch's intra-op threads (``torch.set_num_threads``).
        device: ``cpu`` or ``cuda``.
        fp16: run in half precision.
        note: description under the table.
    """
    import torch

    torch.set_num_threads(threads)
    model = model.eval().to(device=device, dtype=torch.float16 if fp16 else torch.float32)

    def prepare(batch: np.ndarray) -> Call:
        x = torch.from_numpy(batch).to(device=device, dtype=torch.float16 if fp16 else torch.float32)

        def call() -> object:
            with torch.inference_mode():
                out = model(x)
            if device != "cpu":
                torch.cuda.synchronize()
            return out
        return call

    return Variant(name, prepare, note)
