"""torchvision's model names of every task (:mod:`gn_convert.tasks`), and building the architectures
without their weights.

Building a model only to read its layers, or to overwrite its weights at once, should not pay
for the weight initialisation: :func:`build_model` with ``init_weights=False`` builds on the
meta device (no memory, no init) and then allocates empty tensors on the CPU. Nothing is patched,
so other threads building models at the same time are unaffected.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from gn_convert.atomic import atomic_file
from gn_convert.errors import UnknownModelError
from gn_convert.load.timm_models import build_timm, check_timm_name, is_timm_name
from gn_convert.surgery.registry import is_batchnorm
from gn_convert.tasks import CLASSIFICATION, TASKS, all_names, task_of

log = logging.getLogger(__name__)


def classification_names() -> list[str]:
    """Every torchvision classification model name, sorted."""
    return CLASSIFICATION.names()


def check_model_name(name: str) -> None:
    """Raise :class:`UnknownModelError` unless ``name`` is a torchvision model of a task gn-convert serves
    (classification, segmentation, detection, video) or ``timm/...``."""
    if is_timm_name(name):
        check_timm_name(name)
        return
    names = all_names()
    if name not in names:
        close = [n for n in names if n.startswith(name[:4])][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint}; `gn-convert list` shows the supported models")


def build_torchvision(name: str, **kwargs: Any) -> nn.Module:
    """torchvision's builder of ``name`` (through its task: dense models built without weights do not
    fetch backbone weights either)."""
    return task_of(name).build(name, **kwargs)


def build_model(name: str, *, num_classes: int | None = None, init_weights: bool = True) -> nn.Module:
    """Build an untrained torchvision (or ``timm/...``) model.

    Args:
        name: a torchvision classification model name, or ``timm/<architecture>`` (always
            initialised: timm models may compute buffers at construction).
        num_classes: classifier size (torchvision's default when None).
        init_weights: run the weight init (default). False builds on the meta device and
            allocates uninitialised CPU tensors: much faster when the weights are about to be
            overwritten, and the tensors hold garbage until they are.

    Raises:
        UnknownModelError: ``name`` is not a torchvision classification model nor a timm one.
    """
    check_model_name(name)
    if is_timm_name(name):
        return build_timm(name, num_classes=num_classes)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if init_weights:
        return build_torchvision(name, **kwargs)
    skeleton = _structure(name, **kwargs)
    return skeleton.to_empty(device="cpu") if next(skeleton.parameters()).is_meta else skeleton


def _structure(name: str, **kwargs: Any) -> nn.Module:
    """The model on the meta device (its modules, no memory); built normally when its
    constructor computes with tensors (RegNet's widths), which meta tensors cannot."""
    try:
        with torch.device("meta"):
            return build_torchvision(name, **kwargs)
    except (NotImplementedError, RuntimeError):
        return build_torchvision(name, **kwargs)


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gn_convert"
    return root / f"batchnorm-models-torchvision-{torchvision.__version__}.json"


@functools.lru_cache(maxsize=1)
def _with_batchnorm() -> frozenset[str]:
    """Every torchvision model (of every task) that contains BatchNorm: built on the meta device once,
    then cached on disk per torchvision version (``~/.cache/gn_convert``)."""
    cache = _cache_file()
    names = all_names()
    try:
        cached = json.loads(cache.read_text())
        if cached["all"] == names:
            return frozenset(str(name) for name in cached["batchnorm"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = [name for name in names if any(is_batchnorm(m) for m in _structure(name).modules())]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cache) as tmp:
            tmp.write_text(json.dumps({"all": names, "batchnorm": found}))
    except Exception as err:  # noqa: BLE001 - a cache that cannot be written is only slower
        log.debug("cannot cache the model list: %s", err)
    return frozenset(found)


def list_models(task: str | None = None) -> list[str]:
    """The torchvision models that contain BatchNorm, sorted.

    Args:
        task: ``classification``, ``segmentation``, ``detection`` or ``video``; None for every task.
    """
    names = TASKS[task].names() if task is not None else all_names()
    return sorted(set(names) & _with_batchnorm())


def models_by_task() -> dict[str, tuple[list[str], list[str]]]:
    """Per task, (the models with BatchNorm, the models without: nothing to convert)."""
    found = _with_batchnorm()
    return {name: ([n for n in task.names() if n in found], [n for n in task.names() if n not in found])
            for name, task in TASKS.items()}
