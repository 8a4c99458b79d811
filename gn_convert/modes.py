"""Temporarily putting models in train or eval mode, restoring every module's own mode afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def training_mode(*models: nn.Module, training: bool) -> Iterator[None]:
    """Put ``models`` in training (``training=True``) or eval mode for the block.

    Each module's ``training`` flag is restored afterwards, one by one, so a model whose
    modules were in mixed modes (a frozen BatchNorm inside a training model) comes back as it was.

    Args:
        models: the models.
        training: the mode inside the block.
    """
    saved = [(module, module.training) for model in models for module in model.modules()]
    for model in models:
        model.train(training)
    try:
        yield
    finally:
        for module, was in saved:
            module.training = was


def eval_mode(*models: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Put ``models`` in eval mode for the block (see :func:`training_mode`)."""
    return training_mode(*models, training=False)
