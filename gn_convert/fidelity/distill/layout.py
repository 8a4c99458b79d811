"""How a distillation step runs on its device: channels-last memory layout and mixed precision.

Measured on EfficientNet-Lite0 (224 px, batch 16, 2 threads, a Xeon with AVX-512-BF16 and AMX;
``scripts/recovery_throughput.py``, docs/FIDELITY.md, "Recovery throughput"): the step alone (the
teacher's forward, the student's forward, backward and AdamW step) gave 1.23-1.44x the images a second in
channels-last, 1.09-1.22x with bfloat16 autocast and 1.16-1.27x with both; ``torch.compile`` of the
student 0.88-1.07x after 39-84 s of compilation; batch 32 fewer images a second than batch 16 (both
channels-last). Recovery with channels-last (and the GroupNorm-output loss reduced in memory order) ran
1.52x the steps in 450 s.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch import nn


def cpu_bf16_supported() -> bool:
    """Whether this CPU runs bfloat16 matrix kernels natively (AVX-512-BF16 or AMX, through oneDNN)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device, amp: bool, cpu_bf16: bool) -> torch.dtype | None:
    """The autocast dtype of a step on ``device``, or None for float32.

    CUDA (``amp``): bfloat16 where the GPU supports it, else float16 (with a gradient scaler). CPU
    (``cpu_bf16``): bfloat16 where the CPU runs it natively; elsewhere emulated bfloat16 is slower than
    float32, so float32.
    """
    if device.type == "cuda":
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if amp else None
    if device.type == "cpu" and cpu_bf16 and cpu_bf16_supported():
        return torch.bfloat16
    return None


@contextlib.contextmanager
def channels_last(*modules: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Lay out the 4-D parameters and buffers of ``modules`` channels-last inside the block.

    The values never change, only the strides: on leaving, each tensor goes back to the strides it
    had (trained values kept), so the caller's models keep their layout. Tensors of other ranks
    (3-D video weights, biases) are left as they are.
    """
    changed: list[tuple[torch.Tensor, tuple[int, ...]]] = []
    if enabled:
        for module in modules:
            for tensor in itertools.chain(module.parameters(), module.buffers()):
                if tensor.dim() == 4 and not _is_channels_last(tensor):
                    changed.append((tensor, tensor.stride()))
                    tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for tensor, stride in changed:
            data = tensor.data
            tensor.data = torch.empty_strided(data.shape, stride, dtype=data.dtype, device=data.device).copy_(data)


def images_layout(images: torch.Tensor, enabled: bool) -> torch.Tensor:
    """A 4-D batch of images channels-last when ``enabled``; anything else as it is."""
    return images.contiguous(memory_format=torch.channels_last) if enabled and images.dim() == 4 else images


def _is_channels_last(tensor: torch.Tensor) -> bool:
    """Already laid out channels-last (and not also plainly contiguous, as a tensor with one channel is)."""
    return tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()
