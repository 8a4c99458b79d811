"""onnxruntime execution providers: which are present, and sessions at two optimisation levels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from .errors import ParityError

PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cpu-native": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
NATIVE = "cpu-native"
"""The CPU provider with gn-convert's native GroupNorm kernel registered (:mod:`gn_convert.native`)."""
LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class Availability:
    """Whether a requested provider can run here, and why not."""

    name: str
    available: bool
    reason: str = ""


def parse_providers(text: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"cpu,cuda"`` (or a list) -> checked short names, in order, without repeats.

    Raises:
        ParityError: an unknown provider name.
    """
    names = text.split(",") if isinstance(text, str) else list(text)
    result: list[str] = []
    for name in (n.strip().lower() for n in names if n.strip()):
        if name not in PROVIDERS:
            raise ParityError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
        if name not in result:
            result.append(name)
    if not result:
        raise ParityError("no provider given; use for example --providers cpu,cuda")
    return result


def availability(name: str) -> Availability:
    """Whether onnxruntime here offers the provider (a GPU is checked when a session starts).

    ``cpu-native`` is available where the native kernel builds (its first use compiles it).
    """
    if name == NATIVE:
        from ..native import NativeBuildError, build_library

        try:
            build_library()
        except NativeBuildError as err:
            return Availability(name, False, str(err))
        return Availability(name, True)
    offered = ort.get_available_providers()
    if PROVIDERS[name] in offered:
        return Availability(name, True)
    hint = "install onnxruntime-gpu" if name in ("cuda", "tensorrt") else "reinstall onnxruntime"
    return Availability(name, False, f"this onnxruntime ({ort.__version__}) offers only "
                                     f"{', '.join(offered)}; {hint} on a machine with an NVIDIA GPU")


def session(path: Path | bytes, provider: str, level: str, threads: int = 0) -> ort.InferenceSession:
    """An inference session on one provider at one optimisation level.

    Args:
        path: the model file, or serialised model bytes.
        provider: short provider name (``cpu-native`` registers the native kernel library).
        level: ``off`` (no graph optimisation) or ``all``.
        threads: intra-op threads (0: onnxruntime's default).

    Returns:
        The session.

    Raises:
        RuntimeError: the provider could not start (onnxruntime fell back to another one).
    """
    if provider == NATIVE:
        from ..native import session_options

        options = session_options()
    else:
        options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    chain = [PROVIDERS[provider]] + ([] if PROVIDERS[provider] == PROVIDERS["cpu"] else [PROVIDERS["cpu"]])
    sess = ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=chain)
    if sess.get_providers()[0] != PROVIDERS[provider]:
        raise RuntimeError(f"onnxruntime could not start {PROVIDERS[provider]} (no GPU visible?)")
    return sess
