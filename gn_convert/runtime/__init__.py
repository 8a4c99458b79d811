"""The one place gn-convert opens onnxruntime sessions (options and providers: :mod:`.options`; OpenVINO's
CPU runtime behind the same interface: :mod:`.openvino`).

Parity, the latency harness and the Triton server all call :func:`open_session`: the
execution provider by short name, the optimisation level, intra-op threads, thread-pool
spinning, gn-convert's native kernel library, and onnxruntime's own exception types (``Fail``,
``InvalidGraph``, ``EPFail``, ``RuntimeException``, ...) turned into one-line errors of ours.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gn_convert.errors import (
    GnConvertError,
    NativeBuildError,
    OptionError,
    ProviderUnavailableError,
    SessionError,
    first_line,
)
from gn_convert.runtime.options import LEVELS, NATIVE, PROVIDERS, check_provider, session_options

__all__ = ["LEVELS", "NATIVE", "PROVIDERS", "check_provider", "open_session", "run_session", "session_options"]

log = logging.getLogger(__name__)

BLOCK_REFUSAL = re.compile(r"(GroupNormNchwc|ScaleNchwc): this model was written for onnxruntime's blocked layout.*")
"""The line the blocked kernels fail with on a CPU of another block (``gn_convert/native/nchwc_block.h``)."""


def open_session(model: str | Path | bytes, *, provider: str = "cpu", threads: int = 0, level: str = "all",
                 spinning: bool | None = None, library: str | Path | None = None,
                 disabled_optimizers: Sequence[str] = (), blocked: bool | None = None, cache: bool = True) -> Any:
    """An ``onnxruntime.InferenceSession`` on one provider, failing with one clear line.

    Args:
        model: the ``.onnx`` file (its external data beside it) or serialised model bytes.
        provider: a key of :data:`PROVIDERS`. GPU providers fall back to the CPU for the ops
            they lack; a GPU provider that cannot start at all is an error, not a silent CPU run.
            ``openvino`` and ``openvino-default`` open an OpenVINO CPU session instead
            (:class:`gn_convert.runtime.openvino.OpenVinoSession`, onnxruntime's session interface).
        threads, level, spinning: see :func:`session_options`; for OpenVINO, ``level`` is the shape mode
            (``dynamic`` or ``static``) and ``spinning`` does not apply.
        library: the native kernel library; required for ``cpu-native``, allowed with ``cpu``.
        disabled_optimizers: onnxruntime graph transformers to switch off (experiments).
        blocked: with the kernel library on the CPU at level ``all``, compute the GroupNorms on
            onnxruntime's blocked layout (:mod:`gn_convert.native.nchwc`: no reorders around them,
            the following Add and activation fused). None (default): where this CPU has that
            layout, else the plain kernel; False: never; True: required (an error where it cannot be).
        cache: keep the blocked-layout rewrite in gn-convert's disk cache and reuse it on later opens
            (:mod:`gn_convert.native.nchwc_cache`; ``GN_CONVERT_NO_NCHWC_CACHE=1`` turns it off everywhere).

    Raises:
        OptionError: ``blocked=True`` with options that rule it out (no library, a GPU provider, a
            level other than ``all``, disabled optimizers).
        SessionError: the file is missing or onnxruntime cannot load it (its first line quoted; a
            blocked model written for another CPU's block: the kernel's own line).
        ProviderUnavailableError: the provider is absent or could not start.
        NativeBuildError: ``cpu-native`` without a library, or a library onnxruntime refuses.
    """
    if provider.startswith("openvino"):
        return _open_openvino(model, provider, threads, level, library)
    import onnxruntime as ort

    if blocked:
        _check_blocked_options(provider, level, library, disabled_optimizers)
    name = check_provider(provider)
    if provider == NATIVE and library is None:
        raise NativeBuildError("the cpu-native provider needs the kernel library: pass the path that "
                               "`gn-convert native` printed")
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise SessionError(f"ONNX file {model} not found")
    options = session_options(threads=threads, level=level, spinning=spinning, library=library)
    if library is not None and provider in ("cpu", NATIVE) and level == "all" and not disabled_optimizers \
            and blocked is not False:
        sess = _open_blocked(model, library, options, required=bool(blocked), cache=cache)
        if sess is not None:
            return sess
    chain = [name] + ([] if name == PROVIDERS["cpu"] else [PROVIDERS["cpu"]])
    what = "the model" if isinstance(model, bytes) else str(model)
    try:
        sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options, providers=chain,
                                    disabled_optimizers=list(disabled_optimizers) or None)
    except Exception as err:  # Fail, InvalidGraph, InvalidArgument, NoSuchFile, EPFail, RuntimeException...
        raise _block_refusal(err, what) or SessionError(f"onnxruntime cannot load {what} on {provider}: "
                                                        f"{first_line(err)}") from err
    if sess.get_providers()[0] != name:
        raise ProviderUnavailableError(f"onnxruntime could not start {name} for {what} (no GPU visible?)")
    return sess


def _open_openvino(model: str | Path | bytes, provider: str, threads: int, level: str,
                   library: str | Path | None) -> Any:
    """An OpenVINO CPU session (:mod:`gn_convert.runtime.openvino`); ``level`` is its shape mode."""
    from gn_convert.runtime.openvino import SHAPE_MODES, open_openvino

    if library is not None:
        raise OptionError("gn-convert's native kernel library is for onnxruntime; OpenVINO cannot load it")
    if level not in SHAPE_MODES:
        raise OptionError(f"OpenVINO sessions take a shape mode ({', '.join(SHAPE_MODES)}) as their level, "
                          f"not {level!r}")
    return open_openvino(model, provider, threads=threads, shapes=level)


def _check_blocked_options(provider: str, level: str, library: str | Path | None,
                           disabled_optimizers: Sequence[str]) -> None:
    """Raise when ``blocked=True`` cannot be honoured with these options (never a silent plain session)."""
    problems = [problem for problem, present in (
        ("the native kernel library (library=)", library is None),
        (f"the CPU provider (not {provider})", provider not in ("cpu", NATIVE)),
        (f"optimisation level 'all' (not {level!r})", level != "all"),
        (f"onnxruntime's optimizers (not disabled: {', '.join(disabled_optimizers)})", bool(disabled_optimizers)),
    ) if present]
    if problems:
        raise OptionError(f"blocked=True needs {' and '.join(problems)}; drop blocked=True or change those options")


def _open_blocked(model: str | Path | bytes, library: str | Path, options: Any, *, required: bool,
                  cache: bool = True) -> Any | None:
    """A CPU session of ``model`` with its GroupNorms on the blocked layout, checked against
    onnxruntime's own model; None where that cannot be (no NCHWc layout here, no GroupNorm to
    move, a model onnxruntime refuses: the plain session then says why), unless ``required``."""
    from gn_convert.native.nchwc import blocked_session

    try:
        sess, _, fused = blocked_session(model, library, options, cache=cache)
        if sess is None:
            raise NativeBuildError("no GroupNorm of this model runs on the blocked layout (none follows a convolution)")
        log.info("native kernel on the blocked layout: %d GroupNorm layers", fused)
        return sess
    except Exception as err:  # NativeBuildError, SessionError, or onnxruntime's own types
        refusal = _block_refusal(err, "the model" if isinstance(model, bytes) else str(model))
        if refusal is not None:  # a blocked model for another CPU: no session of it can be right here
            raise refusal from err
        if required:
            raise NativeBuildError(f"cannot move the GroupNorms onto onnxruntime's blocked layout: {first_line(err)}") \
                from err
        log.info("plain native kernel: %s", first_line(err))
        return None


def _block_refusal(err: BaseException, what: str) -> SessionError | None:
    """The blocked kernels' own line (a model written for another CPU's block) as our error, or None;
    looked for in ``err`` and the errors it was raised from (onnxruntime's own is untruncated)."""
    cause: BaseException | None = err
    while cause is not None:
        refusal = BLOCK_REFUSAL.search(first_line(cause, limit=1000))
        if refusal is not None:
            return SessionError(f"cannot open {what}: {refusal.group(0)}")
        cause = cause.__cause__
    return None


def run_session(sess: Any, feeds: dict[str, Any], outputs: Sequence[str] | None = None) -> list[Any]:
    """``sess.run`` with onnxruntime's exceptions turned into one :class:`SessionError` line."""
    try:
        results: list[Any] = sess.run(list(outputs) if outputs is not None else None, feeds)
        return results
    except GnConvertError:  # an OpenVINO session's own error already says what failed
        raise
    except Exception as err:  # onnxruntime's own types, raised at run time (a kernel refusing a shape)
        raise SessionError(f"onnxruntime failed to run the model: {first_line(err)}") from err
