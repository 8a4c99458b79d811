"""Temporarily putting models in eval mode, restoring every module's own mode afterwards."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode for the block.

    Each module's ``training`` flag is restored afterwards, one by one, so a model whose
    modules were in mixed modes (a frozen BatchNorm inside a training model) comes back as it was.

    Args:
        models: the models.
    """
    saved = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training
