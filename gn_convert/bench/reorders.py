"""The layout reorders onnxruntime's CPU optimiser leaves in a model, counted in the graph it runs.

onnxruntime runs convolutions on its blocked NCHWc layout and inserts ``com.microsoft.nchwc``
``ReorderOutput`` (blocked -> plain) and ``ReorderInput`` (plain -> blocked) nodes wherever an op
it cannot run blocked reads or feeds a blocked tensor (``scripts/PERF.md``). :func:`count_reorders`
opens a model at ``ORT_ENABLE_ALL``, takes the graph onnxruntime writes
(``SessionOptions.optimized_model_filepath``) and counts those nodes, separating reorders of full
activations from reorders of ``[N, C, 1, 1]`` statistics, whose cost is negligible. The result
depends on the CPU (no reorder at all where onnxruntime has no NCHWc kernels: block 1) and on
onnxruntime's version, like the optimised graph itself.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

NCHWC_DOMAIN = "com.microsoft.nchwc"


@dataclass(frozen=True)
class ReorderCounts:
    """Reorders in the graph onnxruntime runs for one model on this CPU.

    Attributes:
        large_out: ``ReorderOutput`` nodes of tensors with a spatial size above 1x1.
        large_in: ``ReorderInput`` nodes of such tensors (the model's input's included).
        small_out: ``ReorderOutput`` nodes of ``[N, C, 1, 1]`` tensors (pooled statistics).
        small_in: ``ReorderInput`` nodes of ``[N, C, 1, 1]`` tensors.
        large_elements: elements per sample that the large reorders move (``C * H * W`` each, C
            the plain tensor's channels).
    """

    large_out: int
    large_in: int
    small_out: int
    small_in: int
    large_elements: int

    @property
    def large(self) -> int:
        """Reorders of full activations, both directions."""
        return self.large_out + self.large_in

    def to_dict(self) -> dict[str, int]:
        """The counts as a plain dict, ``large`` included."""
        return {**asdict(self), "large": self.large}


def optimized_model(model: str | Path | bytes, *, threads: int = 1) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs for ``model`` at ``ORT_ENABLE_ALL`` on this machine."""
    import onnxruntime as ort

    from gn_convert.runtime.options import session_options

    with tempfile.TemporaryDirectory(prefix="gn-reorders-") as tmp:
        options = session_options(threads=threads, level="all")
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        source = model if isinstance(model, bytes) else str(model)
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath)


def _plain_shapes(optimized: onnx.ModelProto, values: list[str], input_shape: Sequence[int] | None,
                  threads: int) -> dict[str, tuple[int, ...]]:
    """The shapes ``values`` take when the optimised graph runs once on zeros (batch 1)."""
    import numpy as np
    import onnxruntime as ort

    from gn_convert.runtime.options import session_options

    probe = onnx.ModelProto()
    probe.CopyFrom(optimized)
    known = {output.name for output in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(v) for v in dict.fromkeys(values) if v not in known)
    session = ort.InferenceSession(probe.SerializeToString(), session_options(threads=threads, level="off"),
                                   providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in session.get_inputs():
        dims = [d if isinstance(d, int) else 1 for d in inp.shape]
        if input_shape is not None and len(input_shape) == len(dims):
            dims = [1, *input_shape[1:]]
        kind = np.float16 if inp.type == "tensor(float16)" else np.float32
        feeds[inp.name] = np.zeros(dims, kind)
    names = [output.name for output in session.get_outputs()]
    return {name: tuple(out.shape) for name, out in zip(names, session.run(names, feeds))}


def count_reorders(model: str | Path | onnx.ModelProto, *, input_shape: Sequence[int] | None = None,
                   threads: int = 1) -> ReorderCounts:
    """Count the NCHWc reorders onnxruntime inserts into ``model`` here, large and small.

    The optimised graph runs once on zeros, at batch 1, to measure each reordered tensor.

    Args:
        model: an ``.onnx`` file (its external data beside it) or a loaded model.
        input_shape: the input's shape where it has symbolic dimensions other than the batch
            (``(1, 3, 224, 224)``); symbolic dimensions are 1 otherwise.
        threads: intra-op threads of the sessions (the optimised graph does not depend on them).

    Returns:
        The counts; every count is 0 where onnxruntime has no NCHWc layout on this CPU.
    """
    optimized = optimized_model(model.SerializeToString() if isinstance(model, onnx.ModelProto) else model,
                                threads=threads)
    reorders = [node for node in optimized.graph.node
                if node.domain == NCHWC_DOMAIN and node.op_type in ("ReorderOutput", "ReorderInput")]
    plain = [node.output[0] if node.op_type == "ReorderOutput" else node.input[0] for node in reorders]
    shapes = _plain_shapes(optimized, plain, input_shape, threads) if reorders else {}
    counts = {"large_out": 0, "large_in": 0, "small_out": 0, "small_in": 0, "large_elements": 0}
    for node, value in zip(reorders, plain):
        dims = shapes[value]
        side = "out" if node.op_type == "ReorderOutput" else "in"
        if math.prod(dims[2:]) == 1:
            counts[f"small_{side}"] += 1
        else:
            counts[f"large_{side}"] += 1
            counts["large_elements"] += math.prod(dims[1:])
    return ReorderCounts(**counts)
