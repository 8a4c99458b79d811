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
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn


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
