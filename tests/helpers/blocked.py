"""Small GroupNorm networks for the blocked-layout tests (the cache, the kernels' block check, the
blocked deploy), and a way to make a blocked model say it was written for another block."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

OP_DOMAIN = "ai.gn_convert"


def small_se_net() -> nn.Module:
    """conv -> GN -> HardSwish -> squeeze-excite -> conv -> GN + residual -> head: every blocked op
    (GroupNormNchwc with and without the residual, ScaleNchwc, the blocked pooling)."""
    from torchvision.ops import SqueezeExcitation

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.Hardswish(),
                                      SqueezeExcitation(32, 8, scale_activation=nn.Hardsigmoid))
            self.conv, self.norm = nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(4, 32)
            self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            return self.head(self.norm(self.conv(h)) + h)

    torch.manual_seed(0)
    net = Net()
    for m in net.modules():
        if isinstance(m, nn.GroupNorm):  # non-trivial affine
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return net.eval()


def export_small_se_net(path: Path) -> Path:
    """:func:`small_se_net` exported by gn-convert (dynamic batch, 32x32 input) to ``path``."""
    from gn_convert.onnx import export_onnx

    export_onnx(small_se_net(), path, input_shape=(1, 3, 32, 32))
    return path


def with_block(data: bytes, block: int, ops: tuple[str, ...] = ("GroupNormNchwc", "ScaleNchwc")) -> bytes:
    """A blocked model whose ``ops`` nodes say they were written for ``block`` (and its metadata too)."""
    from gn_convert.native.nchwc import BLOCK_KEY

    model = onnx.load_from_string(data)
    for node in model.graph.node:
        if node.domain == OP_DOMAIN and node.op_type in ops:
            next(a for a in node.attribute if a.name == "block").i = block
    for prop in model.metadata_props:
        if prop.key == BLOCK_KEY:
            prop.value = str(block)
    return model.SerializeToString()
