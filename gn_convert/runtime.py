"""The one place gn-convert opens onnxruntime sessions.

Parity, the latency harness and the Triton server all call :func:`open_session`: the
execution provider by short name, the optimisation level, intra-op threads, thread-pool
spinning, gn-convert's native kernel library, and onnxruntime's own exception types (``Fail``,
``InvalidGraph``, ``EPFail``, ``RuntimeException``, ...) turned into one-line errors of ours.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from gn_convert.errors import NativeBuildError, ProviderUnavailableError, SessionError, first_line

log = logging.getLogger(__name__)

#: short provider name -> onnxruntime execution provider
PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cpu-native": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
NATIVE = "cpu-native"
"""The CPU provider with gn-convert's native GroupNorm kernel registered (:mod:`gn_convert.native`)."""
LEVELS: tuple[str, ...] = ("off", "basic", "all")


def check_provider(provider: str) -> str:
    """onnxruntime's name for a short provider name that this onnxruntime offers.

    Raises:
        SessionError: an unknown name.
        ProviderUnavailableError: this onnxruntime build lacks the provider.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise SessionError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    offered = ort.get_available_providers()
    if name not in offered:
        hint = "install onnxruntime-gpu on a machine with an NVIDIA GPU" if provider in ("cuda", "tensorrt") \
            else "reinstall onnxruntime"
        raise ProviderUnavailableError(f"{name} is not available in this onnxruntime ({ort.__version__}, "
                                       f"providers: {', '.join(offered)}); {hint}")
    return name


def session_options(*, threads: int = 0, level: str = "all", spinning: bool | None = None,
                    library: str | Path | None = None) -> Any:
    """onnxruntime ``SessionOptions`` as gn-convert uses them.

    Args:
        threads: intra-op threads (0: onnxruntime's default, one per core).
        level: graph optimisation ``off``, ``basic`` or ``all``.
        spinning: whether idle pool threads spin; None keeps onnxruntime's default (on). Timing
            wants it off: spinning threads of one session steal the cores of the next one timed.
        library: a custom-op library to register (gn-convert's native kernel).

    Raises:
        SessionError: an unknown level.
        NativeBuildError: onnxruntime refuses to load ``library``.
    """
    import onnxruntime as ort

    levels = {"off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if level not in levels:
        raise SessionError(f"unknown optimisation level {level!r}; choose one of {', '.join(LEVELS)}")
    options = ort.SessionOptions()
    if library is not None:
        try:
            options.register_custom_ops_library(str(library))
        except Exception as err:  # onnxruntime raises its own types (Fail, RuntimeError)
            raise NativeBuildError(f"onnxruntime cannot load {library}: {first_line(err)}; rebuild it with "
                                   "`gn-convert native --force`") from err
    options.graph_optimization_level = levels[level]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def open_session(model: str | Path | bytes, *, provider: str = "cpu", threads: int = 0, level: str = "all",
                 spinning: bool | None = None, library: str | Path | None = None,
                 disabled_optimizers: Sequence[str] = (), blocked: bool | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` on one provider, failing with one clear line.

    Args:
        model: the ``.onnx`` file (its external data beside it) or serialised model bytes.
        provider: a key of :data:`PROVIDERS`. GPU providers fall back to the CPU for the ops
            they lack; a GPU provider that cannot start at all is an error, not a silent CPU run.
        threads, level, spinning: see :func:`session_options`.
        library: the native kernel library; required for ``cpu-native``, allowed with ``cpu``.
        disabled_optimizers: onnxruntime graph transformers to switch off (experiments).
        blocked: with the kernel library on the CPU at level ``all``, compute the GroupNorms on
            onnxruntime's blocked layout (:mod:`gn_convert.native.nchwc`: no reorders around them,
            the following Add and activation fused). None (default): where this CPU has that
            layout, else the plain kernel; False: never; True: required.

    Raises:
        SessionError: the file is missing or onnxruntime cannot load it (its first line quoted).
        ProviderUnavailableError: the provider is absent or could not start.
        NativeBuildError: ``cpu-native`` without a library, or a library onnxruntime refuses.
    """
    import onnxruntime as ort

    name = check_provider(provider)
    if provider == NATIVE and library is None:
        raise NativeBuildError("the cpu-native provider needs the kernel library: pass the path that "
                               "`gn-convert native` printed")
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise SessionError(f"ONNX file {model} not found")
    options = session_options(threads=threads, level=level, spinning=spinning, library=library)
    if library is not None and provider in ("cpu", NATIVE) and level == "all" and not disabled_optimizers \
            and blocked is not False:
        sess = _open_blocked(model, library, options, required=bool(blocked))
        if sess is not None:
            return sess
    chain = [name] + ([] if name == PROVIDERS["cpu"] else [PROVIDERS["cpu"]])
    what = "the model" if isinstance(model, bytes) else str(model)
    try:
        sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=chain,
                                    disabled_optimizers=list(disabled_optimizers) or None)
    except Exception as err:  # Fail, InvalidGraph, InvalidArgument, NoSuchFile, EPFail, RuntimeException...
        raise SessionError(f"onnxruntime cannot load {what} on {provider}: {first_line(err)}") from err
    if sess.get_providers()[0] != name:
        raise ProviderUnavailableError(f"onnxruntime could not start {name} for {what} (no GPU visible?)")
    return sess


def _open_blocked(model: str | Path | bytes, library: str | Path, options: Any, *, required: bool) -> Any | None:
    """A CPU session of ``model`` with its GroupNorms on the blocked layout, checked against
    onnxruntime's own model; None where that cannot be (no NCHWc layout here, no GroupNorm to
    move, a model onnxruntime refuses: the plain session then says why), unless ``required``."""
    import onnxruntime as ort

    from gn_convert.native.nchwc import blocked_graph, check_blocked

    try:
        data, fused, reference = blocked_graph(model, library)
        if not fused:
            return None
        sess = ort.InferenceSession(data, options, providers=[PROVIDERS["cpu"]])
        check_blocked(reference, sess)
        return sess
    except Exception as err:  # NativeBuildError, SessionError, or onnxruntime's own types
        if required:
            raise NativeBuildError(f"cannot move the GroupNorms onto onnxruntime's blocked layout: {first_line(err)}") \
                from err
        log.info("plain native kernel: %s", first_line(err))
        return None


def run_session(sess: Any, feeds: dict[str, Any], outputs: Sequence[str] | None = None) -> list[Any]:
    """``sess.run`` with onnxruntime's exceptions turned into one :class:`SessionError` line."""
    try:
        return sess.run(list(outputs) if outputs is not None else None, feeds)
    except Exception as err:  # onnxruntime's own types, raised at run time (a kernel refusing a shape)
        raise SessionError(f"onnxruntime failed to run the model: {first_line(err)}") from err
