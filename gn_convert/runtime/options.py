"""onnxruntime's providers by short name and the ``SessionOptions`` gn-convert opens sessions with.

The lowest layer of :mod:`gn_convert.runtime`: it knows nothing of gn-convert's graphs, so graph
passes that must open a session of their own (the blocked-layout rewrite) use it without
depending on the session factory that uses them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gn_convert.errors import NativeBuildError, ProviderUnavailableError, SessionError, first_line

#: short provider name -> onnxruntime execution provider (or, for ``openvino*``, the OpenVINO runtime itself and its
#: precision: :mod:`gn_convert.runtime.openvino`)
PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cpu-native": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINO CPU, f32",
    "openvino-default": "OpenVINO CPU, default precision",
}
NATIVE = "cpu-native"
"""The CPU provider with gn-convert's native GroupNorm kernel registered (:mod:`gn_convert.native`)."""
LEVELS: tuple[str, ...] = ("off", "basic", "all")


GPU_INSTALL = "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'onnxruntime-gpu>=1.30'"
"""How to get the CUDA build: onnxruntime and onnxruntime-gpu install the same ``onnxruntime`` module,
so one must replace the other (installed together they overwrite each other's files)."""


def installed_runtimes() -> list[str]:
    """The onnxruntime distributions installed here (``onnxruntime``, ``onnxruntime-gpu``, ...)."""
    from importlib import metadata

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def gpu_install_hint() -> str:
    """What to do for the CUDA provider, given what is installed."""
    if len(installed_runtimes()) > 1:
        return f"onnxruntime and onnxruntime-gpu are both installed and overwrite each other's files: {GPU_INSTALL}"
    return f"on a machine with an NVIDIA GPU, replace onnxruntime with onnxruntime-gpu: {GPU_INSTALL}"


def check_provider(provider: str) -> str:
    """onnxruntime's name for a short provider name that this onnxruntime offers (for ``openvino*``: its
    description, when openvino is installed).

    Raises:
        SessionError: an unknown name.
        ProviderUnavailableError: this onnxruntime build lacks the provider, or openvino is not installed.
    """
    if provider not in PROVIDERS:
        raise SessionError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    if provider.startswith("openvino"):
        from gn_convert.runtime.openvino import openvino_version

        openvino_version()
        return name
    import onnxruntime as ort

    offered = ort.get_available_providers()
    if name not in offered:
        hint = gpu_install_hint() if provider in ("cuda", "tensorrt") else "reinstall onnxruntime"
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
