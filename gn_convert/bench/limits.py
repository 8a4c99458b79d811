"""The physical limit of GroupNorm's cost: bytes its layers must move over the memory bandwidth.

BatchNorm at inference costs nothing: onnxruntime folds it into the convolution before it. A
GroupNorm layer cannot be folded (its statistics depend on the sample), so at the very least
it reads its input once and writes its output once; the two-pass form of the function body
reads the input twice (mean, then squared deviations) before it writes. When activations do
not fit in cache, that traffic over the machine's memory bandwidth is a floor under the extra
latency of the GroupNorm model, whatever the kernel does. :func:`groupnorm_traffic` counts it
for a model and an input; :func:`memory_bandwidth` measures copy bandwidth with one or more
threads; :func:`floor_ms` combines them.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class Traffic:
    """The activation bytes of a model's GroupNorm layers for one input batch.

    Attributes:
        layers: GroupNorm calls counted.
        activation_bytes: total bytes of their inputs (equal to their outputs').
    """

    layers: int
    activation_bytes: int

    @property
    def minimum_bytes(self) -> int:
        """Read once, write once: the least any GroupNorm kernel moves."""
        return 2 * self.activation_bytes

    @property
    def two_pass_bytes(self) -> int:
        """Read twice (mean, then squared deviations), write once: the function body's floor."""
        return 3 * self.activation_bytes


def groupnorm_traffic(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Traffic:
    """Count the GroupNorm activation bytes of one forward pass on an input of ``input_shape``.

    Args:
        model: a module with ``nn.GroupNorm`` layers (run once in eval mode on zeros).
        input_shape: the full input shape, batch included.
        dtype: the element type the deployed model computes in.
    """
    sizes: list[int] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].numel()))
             for m in model.modules() if isinstance(m, nn.GroupNorm)]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(*input_shape))
    finally:
        model.train(was)
        for hook in hooks:
            hook.remove()
    element = torch.empty((), dtype=dtype).element_size()
    return Traffic(len(sizes), sum(sizes) * element)


def onnx_groupnorm_traffic(model: onnx.ModelProto, input_shape: Sequence[int]) -> Traffic:
    """:func:`groupnorm_traffic` from a function-form ONNX file: the input shape of every
    ``ai.gn_convert::GroupNorm`` node, by shape inference at ``input_shape`` (batch included)."""
    import onnx

    from gn_convert.onnx.external import weights_detached
    from gn_convert.onnx.op import groupnorm_nodes

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    dims = copy.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, input_shape):
        dim.Clear()
        dim.dim_value = int(size)
    with weights_detached(copy):
        inferred = onnx.shape_inference.infer_shapes(copy)
    infos = {v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    total, layers = 0, 0
    for node in groupnorm_nodes(inferred):
        info = infos.get(node.input[0])
        if info is None or not all(d.HasField("dim_value") for d in info.shape.dim):
            raise ValueError(f"the shape of {node.name or node.input[0]} is unknown at input {tuple(input_shape)}")
        element = onnx.helper.tensor_dtype_to_np_dtype(info.elem_type).itemsize
        total += int(np.prod([d.dim_value for d in info.shape.dim])) * element
        layers += 1
    return Traffic(layers, total)


def memory_bandwidth(threads: int = 1, megabytes: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth in bytes per second (read + write counted), with ``threads`` threads at once.

    Each thread copies its own ``megabytes / threads`` array, far larger than any cache; the
    median of ``repeats`` timed copies is used.
    """
    chunk = max(1, megabytes * (1 << 20) // threads // 4)
    sources = [np.ones(chunk, np.float32) for _ in range(threads)]
    targets = [np.empty_like(s) for s in sources]
    seconds = []
    for _ in range(repeats + 1):
        workers = [threading.Thread(target=np.copyto, args=(t, s)) for t, s in zip(targets, sources)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds.append(time.perf_counter() - start)
    return 2 * 4 * chunk * threads / statistics.median(seconds[1:])


def floor_ms(traffic_bytes: int, bandwidth: float) -> float:
    """Milliseconds to move ``traffic_bytes`` at ``bandwidth`` bytes per second."""
    return 1e3 * traffic_bytes / bandwidth


def limit_lines(result: Any, traffic: Callable[[int], Traffic], threads: int, baseline: str) -> list[str]:
    """The physical floor beside the measured overhead, per batch of a bench result.

    Args:
        result: a :class:`gn_convert.bench.harness.BenchResult` with ``baseline`` among its variants.
        traffic: the GroupNorm :class:`Traffic` of the model at a batch size.
        threads: threads copying at once when the bandwidth is measured (the sessions' count).
        baseline: the BatchNorm variant's name.

    Returns:
        A header line and one line per batch size.
    """
    bandwidth = memory_bandwidth(threads)
    lines = [f"physical limit ({threads} thread(s), copy bandwidth {bandwidth / 1e9:.1f} GB/s, activations assumed "
             "out of cache): GroupNorm layers must read and write their activations at least once"]
    for batch in sorted({m.batch for m in result.measurements}):
        moved = traffic(batch)
        floor = floor_ms(moved.minimum_bytes, bandwidth)
        base = result.get(baseline, batch).median_ms
        measured = ", ".join(f"{m.variant} {m.median_ms - base:+.1f} ms ({m.ratio:.2f}x)" for m in result.measurements
                             if m.batch == batch and m.variant != baseline and m.ratio is not None)
        lines.append(f"  b{batch}: {moved.layers} GroupNorm calls move >= {moved.minimum_bytes / 1e6:.0f} MB "
                     f"(two-pass {moved.two_pass_bytes / 1e6:.0f} MB): floor {floor:.1f} ms = "
                     f"{(base + floor) / base:.2f}x {baseline}; measured: {measured}")
    return lines
