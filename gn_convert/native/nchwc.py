"""GroupNorm on onnxruntime's blocked layout: a graph for this machine with no reorders around it.

onnxruntime's CPU provider runs convolutions on a blocked layout (NCHWc: ``[N][C/B][H][W][B]``,
B = 8 or 16 by CPU) and, since it has no blocked kernel for a normalisation, reorders every
GroupNorm's input out of that layout and its output (after the Relu or residual Add + Relu,
which no longer fuse into the convolution) back in. Those reorders are about half of what a
GroupNorm network costs over its BatchNorm original (``scripts/PERF.md``).

:func:`nchwc_model` lets onnxruntime optimise the model once, with the native kernel library
registered, takes the optimised graph it writes (its blocked convolutions and reorders), and
replaces each ``ReorderOutput -> GroupNorm [-> Add] [-> activation] -> ReorderInput`` chain by one
``ai.gn_convert::GroupNormNchwc`` node that reads and writes the blocked tensor, with the Add and
activation fused, and squeeze-excite's pooling and gating by blocked ops too
(:mod:`gn_convert.onnx.passes.blocked_layout`). The result is for this CPU and this onnxruntime only
(the block size and the reordered weights are baked in), like any model onnxruntime optimised
offline: make it where it runs. Its metadata says so (:func:`blocked_metadata`: the block, onnxruntime's
version, the library's ``-march``, the CPU that wrote it), and its blocked kernels refuse, when
onnxruntime creates them, to run on a CPU whose block differs (``nchwc_block.h``).

Opening the same model again is cheap: :func:`blocked_session` keeps each rewrite in a disk cache
(:mod:`gn_convert.native.nchwc_cache`) and, on a hit, skips onnxruntime's optimisation, the rewrite
and the full self-check, and runs the check's cheap form (:func:`check_probe`).
"""

from __future__ import annotations

import functools
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from gn_convert.difference import relative_error
from gn_convert.errors import NativeBuildError, SessionError, first_line
from gn_convert.native import nchwc_cache
from gn_convert.onnx.passes import blocked_layout
from gn_convert.onnx.passes.blocked_layout import FUSED_OP, NCHWC_DOMAIN, OP_DOMAIN
from gn_convert.runtime.compare import BATCHES, SEEDS, compare_sessions, random_feeds

log = logging.getLogger(__name__)

__all__ = ["BLOCK_KEY", "FUSED_OP", "LAYOUT_KEY", "block_size", "blocked_graph", "blocked_metadata", "blocked_session",
           "check_blocked", "check_probe", "nchwc_model", "optimized_graph"]

LAYOUT_KEY = "gn_convert.layout"
BLOCK_KEY = "gn_convert.nchwc_block"
ONNXRUNTIME_KEY = "gn_convert.nchwc_onnxruntime"
LIBRARY_TARGET_KEY = "gn_convert.nchwc_library_target"
WRITTEN_ON_KEY = "gn_convert.nchwc_written_on"


@functools.cache
def block_size() -> int:
    """onnxruntime's NCHWc block size on this CPU (8 with AVX2, 16 with AVX-512; 1: none).

    Measured, not guessed: one ``ReorderInput`` of four channels pads them to the block.
    """
    import onnxruntime as ort

    node = helper.make_node("ReorderInput", ["x"], ["y"], domain=NCHWC_DOMAIN)
    graph = helper.make_graph([node], "block", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 1, 1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(NCHWC_DOMAIN, 1)],
                              ir_version=8)  # onnx's newest IR version is more than older onnxruntimes read
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return int(sess.run(None, {"x": np.ones((1, 4, 1, 1), np.float32)})[0].shape[1])
    except Exception as err:  # no NCHWc kernels in this build or on this CPU
        log.info("no NCHWc layout here: %s", first_line(err))
        return 1


def optimized_graph(model: str | Path | bytes, library: str | Path) -> tuple[onnx.ModelProto, Any]:
    """The graph onnxruntime runs for ``model`` on this CPU, with the kernel library registered,
    and the session that made it."""
    import onnxruntime as ort

    from gn_convert.runtime.options import session_options

    with tempfile.TemporaryDirectory(prefix="gn-nchwc-") as tmp:
        options = session_options(threads=1, level="all", library=library)
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:
            session = ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                           providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own types: Fail, InvalidGraph, NoSuchFile, ...
            what = "the model" if isinstance(model, bytes) else str(model)
            raise SessionError(f"onnxruntime cannot load {what}: {first_line(err)}") from err
        return onnx.load(options.optimized_model_filepath), session


def blocked_metadata(block: int, library: str | Path) -> dict[str, str]:
    """What a blocked model is valid for, as its ``metadata_props``: the layout, the block size, the
    onnxruntime that reordered its weights, the kernel library's ``-march`` and the CPU it was written on."""
    import onnxruntime as ort

    from gn_convert.native.build import cpu_identity, library_target

    cpu = next((line.split(":", 1)[1].strip() for line in cpu_identity().splitlines()
                if line.split(":")[0].strip() == "model name"), "") or cpu_identity().splitlines()[0]
    return {LAYOUT_KEY: f"nchwc{block} (this CPU and onnxruntime only; rebuild elsewhere)", BLOCK_KEY: str(block),
            ONNXRUNTIME_KEY: ort.__version__, LIBRARY_TARGET_KEY: library_target(library), WRITTEN_ON_KEY: cpu}


def nchwc_model(model: str | Path | bytes, library: str | Path) -> tuple[bytes, int]:
    """``model`` optimised by onnxruntime for this CPU, its GroupNorms on the blocked layout.

    Args:
        model: a gn-convert ONNX file (or its bytes) with ``ai.gn_convert::GroupNorm`` nodes.
        library: the native kernel library (:func:`gn_convert.native.build_library`).

    Returns:
        The serialised model, to open with the same library and any optimisation level, and the
        number of GroupNorm nodes moved onto the blocked layout (0: nothing to gain here). A
        rewritten model has passed :func:`check_blocked`.

    Raises:
        NativeBuildError: this CPU or onnxruntime has no NCHWc layout, or the check failed.
        SessionError: onnxruntime cannot load ``model``.
    """
    from gn_convert.runtime.options import session_options

    _, data, fused = blocked_session(model, library, session_options(threads=1, level="all", library=library))
    return data, fused


def blocked_session(model: str | Path | bytes, library: str | Path, options: Any,
                    cache: bool = True) -> tuple[Any | None, bytes, int]:
    """A CPU session of the rewritten model (opened with ``options``, which must register
    ``library``) after :func:`check_blocked` passed on it, the model's bytes, and the number of
    GroupNorms moved; the session is None when none moved. Raises as :func:`nchwc_model`.

    With ``cache`` (and the cache not turned off, :mod:`.nchwc_cache`), a rewrite made before for the
    same model, onnxruntime, library and CPU is opened from the disk cache and checked by
    :func:`check_probe` instead; a cached rewrite that fails that check is deleted and made again.
    """
    key = nchwc_cache.cache_key(model, library) if nchwc_cache.enabled(cache) else None
    if key is not None and (entry := nchwc_cache.lookup(key)) is not None:
        try:
            session = _open_rewritten(entry.data, options)
            check_probe(session, entry.probe)
            log.info("blocked-layout model from the cache (%d GroupNorm layers; probe reproduced)", entry.fused)
            return session, entry.data, entry.fused
        except NativeBuildError as err:
            nchwc_cache.discard(key, first_line(err))
    data, fused, reference = blocked_graph(model, library)
    if not fused:
        return None, data, 0
    session = _open_rewritten(data, options)
    check_blocked(reference, session)
    if key is not None:
        nchwc_cache.store(key, nchwc_cache.Entry(data, fused, probe(reference)))
    return session, data, fused


def _open_rewritten(data: bytes, options: Any) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own types: Fail, InvalidGraph, ...
        raise NativeBuildError(f"onnxruntime cannot load the blocked-layout model: {first_line(err)}") from err


SELF_CHECK_TOLERANCE = 1e-3
"""Largest error of the rewritten model on a random input, relative to the output's largest value:
float32 rounding differs by about 1e-6; a layout mistake gives errors near 1."""


def blocked_graph(model: str | Path | bytes, library: str | Path) -> tuple[bytes, int, Any]:
    """The rewritten model (not yet checked), the number of GroupNorms moved, and onnxruntime's own
    session of ``model`` to check it against (:func:`check_blocked`). Raises as :func:`nchwc_model`."""
    block = block_size()
    if block not in (8, 16):
        raise NativeBuildError(f"onnxruntime has no blocked (NCHWc) layout on this CPU (block {block}); "
                               "use the native kernel on the model as it is")
    optimized, reference = optimized_graph(model, library)
    fused = blocked_layout.rewrite(optimized, block)
    if not any(o.domain == OP_DOMAIN for o in optimized.opset_import):
        optimized.opset_import.append(helper.make_opsetid(OP_DOMAIN, 1))
    metadata = blocked_metadata(block, library)
    kept = [(p.key, p.value) for p in optimized.metadata_props if p.key not in metadata]
    del optimized.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        entry = optimized.metadata_props.add()
        entry.key, entry.value = key, value
    log.info("%d GroupNorm layers on the blocked layout (block %d)", fused, block)
    return optimized.SerializeToString(), fused, reference


def check_blocked(reference: Any, rewritten: Any) -> float:
    """Run the rewritten model's session and onnxruntime's own on random inputs: every input of the
    model, at batch 1 and 3 (where the batch axis is dynamic), with two seeds
    (:func:`gn_convert.runtime.compare.compare_sessions`).

    Returns:
        The largest error relative to the output's largest value.

    Raises:
        NativeBuildError: they differ by more than :data:`SELF_CHECK_TOLERANCE`, or either session
            fails on the input (onnxruntime's first line quoted).
    """
    return compare_sessions(reference, rewritten, "the blocked-layout rewrite", NativeBuildError,
                            SELF_CHECK_TOLERANCE, hint="open the model without it (blocked=False) and report this")


def probe(reference: Any) -> nchwc_cache.Probe:
    """The first input of :func:`check_blocked` (batch 1, seed 0) and ``reference``'s outputs on it."""
    feeds = random_feeds(reference.get_inputs(), SEEDS[0], BATCHES[0], NativeBuildError)
    return nchwc_cache.Probe(feeds, [np.asarray(out) for out in reference.run(None, feeds)])


def check_probe(session: Any, expected: nchwc_cache.Probe) -> float:
    """The self-check's cheap form, for a rewrite taken from the cache: run ``session`` on the probe's
    input and compare with the outputs onnxruntime's own session of the original model gave on it when
    the rewrite was made (re-creating that session would cost the optimisation the cache saves).

    Returns:
        The largest error relative to the output's largest value.

    Raises:
        NativeBuildError: the outputs differ by more than :data:`SELF_CHECK_TOLERANCE`, or the session fails.
    """
    try:
        outputs = session.run(None, expected.feeds)
    except Exception as err:  # onnxruntime's own types, raised at run time
        raise NativeBuildError(f"the cached blocked-layout model fails on its probe: {first_line(err)}") from err
    if len(outputs) != len(expected.outputs):
        raise NativeBuildError(f"the cached blocked-layout model has {len(outputs)} outputs, its probe "
                               f"{len(expected.outputs)}")
    worst = max((relative_error(want, got) for want, got in zip(expected.outputs, outputs)), default=0.0)
    if not worst <= SELF_CHECK_TOLERANCE:
        raise NativeBuildError(f"the cached blocked-layout model does not reproduce its probe (relative error "
                               f"{worst:.1e})")
    return worst
