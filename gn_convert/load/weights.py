"""Where a model's weights come from, and loading a model with them.

``weights`` is one of:

- ``"DEFAULT"``, a torchvision weights name (``"IMAGENET1K_V2"``) or a qualified one
  (``"ResNet50_Weights.IMAGENET1K_V2"``, as ``config.json`` records it): torchvision's weights
  API, its download and its cache (``$TORCH_HOME/hub/checkpoints``). Offline with the file not
  cached, loading fails at once with one line naming the cache path. A cached file must match the
  hash in its name, and is read with ``weights_only=True`` too (:mod:`gn_convert.load.hub`).
- for ``timm/...`` names, ``"DEFAULT"`` means timm's pretrained weights of the name's tag
  (see :mod:`gn_convert.load.timm_models`).
- ``"none"``: untrained (random) weights.
- a path to a local file: a state_dict, or a checkpoint dict holding one under a usual key
  (``state_dict``, ``model``, ...), saved with ``torch.save`` or as safetensors. It is read
  with ``torch.load(weights_only=True)``: no code in the file is ever run.

:func:`parse_weights` is the one parser of these spellings; everything else calls it.
"""

from __future__ import annotations

import inspect
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models as tvm

from gn_convert.errors import WeightsError, WeightsUnavailableError, first_line
from gn_convert.load.hub import check_cached, tensors_only
from gn_convert.load.names import build_model, build_torchvision, check_model_name
from gn_convert.load.state_dict import load_weights_into, read_state_dict
from gn_convert.load.timm_models import is_timm_name, load_timm_pretrained, timm_preset
from gn_convert.tasks import task_of

FILE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
PROBE_TIMEOUT_S = 5


@dataclass(frozen=True)
class WeightsSpec:
    """A parsed ``weights`` argument.

    Attributes:
        kind: ``none``, ``file``, ``torchvision`` or ``timm`` (timm's pretrained weights).
        path: the file, for ``file``.
        enum: the torchvision weights enum member, for ``torchvision``; timm's preset for ``timm``.
        model: the ``timm/...`` name, for ``timm``.
    """

    kind: str
    path: Path | None = None
    enum: Any = None
    model: str = ""

    @property
    def label(self) -> str:
        """How reports and ``config.json`` name these weights (``ResNet50_Weights.IMAGENET1K_V2``)."""
        if self.kind == "torchvision":
            return f"{type(self.enum).__name__}.{self.enum.name}"
        if self.kind == "timm":
            return f"{self.model} (timm pretrained)"
        return str(self.path) if self.kind == "file" else "none"


def default_weights_enum(name: str) -> Any:
    """torchvision's DEFAULT weights enum member for ``name`` (its meta needs no download); for a
    ``timm/...`` name, timm's pretrained config in the same shape (``transforms()``, ``meta``)."""
    if is_timm_name(name):
        return timm_preset(name)
    return tvm.get_model_weights(name).DEFAULT


def _is_file_spec(weights: str) -> bool:
    return os.sep in weights or weights.endswith(FILE_SUFFIXES) or Path(weights).exists()


def parse_weights(name: str, weights: str = "DEFAULT") -> WeightsSpec:
    """Parse a ``weights`` argument for model ``name`` (see the module docstring).

    Qualified names go through ``torchvision.models.get_weight``; plain names are looked up in
    the model's own weights enum, so a name of another model's weights is refused.

    Raises:
        UnknownModelError: ``name`` is not a torchvision classification model.
        WeightsError: no such weights name and no such file.
    """
    check_model_name(name)
    if weights.lower() == "none":
        return WeightsSpec("none")
    if _is_file_spec(weights):
        return WeightsSpec("file", path=Path(weights).expanduser())
    if is_timm_name(name):
        if weights.upper() != "DEFAULT":
            raise WeightsError(f"{name} takes weights DEFAULT (timm's pretrained weights; the tag goes in the name, "
                               "timm/resnet50.a1_in1k), none, or a path to a weights file")
        return WeightsSpec("timm", enum=timm_preset(name), model=name)
    enum = tvm.get_model_weights(name)
    if "." in weights:
        try:
            member = tvm.get_weight(weights)
        except (ValueError, KeyError, AttributeError):
            member = None
        if member is not None and type(member) is enum:
            return WeightsSpec("torchvision", enum=member)
    else:
        member = enum.DEFAULT if weights.upper() == "DEFAULT" else enum.__members__.get(weights)
        if member is not None:
            return WeightsSpec("torchvision", enum=member)
    options = ", ".join(["DEFAULT", "none", *enum.__members__])
    raise WeightsError(f"{name} has no weights {weights!r} and no such file exists; choose one of {options} "
                       "or a path to a weights file")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, and what torchvision knows about them.

    Attributes:
        architecture: the torchvision model name.
        weights: ``none``, a weights enum name (``ResNet50_Weights.IMAGENET1K_V2``) or a path.
        input_size: the per-sample spatial size the weights were evaluated at, from torchvision's
            meta: ``(H, W)``, ``(T, H, W)`` for video clips (:meth:`gn_convert.tasks.Task.input_size`).
        categories: class names when the weights carry them.
        task: the model's task (:data:`gn_convert.tasks.TASKS`).
    """

    architecture: str
    weights: str
    input_size: tuple[int, ...]
    categories: list[str] | None = None
    task: str = "classification"


def resolve_source(name: str, weights: str = "DEFAULT") -> ModelSource:
    """Describe where ``name``'s weights come from without loading them.

    Raises:
        UnknownModelError, WeightsError: see :func:`parse_weights`.
    """
    spec = parse_weights(name, weights)
    task = task_of(name)
    categories = None
    if spec.kind in ("torchvision", "timm"):
        categories = list(spec.enum.meta.get("categories") or []) or None
    return ModelSource(name, spec.label, task.input_size(default_weights_enum(name)), categories, task.name)


def parse_backbone_weights(name: str, weights_backbone: str | None) -> Any:
    """The backbone weights enum member for a dense model (``DEFAULT``: the one torchvision's builder
    defaults to; or a name of its backbone's weights), or None for ``none``/None.

    Raises:
        WeightsError: the model has no separate backbone weights, or no such name.
    """
    if weights_backbone is None or weights_backbone.lower() == "none":
        return None
    parameter = inspect.signature(tvm.get_model_builder(name)).parameters.get("weights_backbone")
    default = getattr(parameter, "default", None)
    enum = type(default) if default is not None and not isinstance(default, type) else None
    if enum is None:
        raise WeightsError(f"{name} takes no separate backbone weights; --weights-backbone applies to torchvision's "
                           "segmentation and detection models")
    # DEFAULT: the builder's own default (ResNet50_Weights.IMAGENET1K_V1 for DeepLabV3, not the enum's DEFAULT)
    member = default if weights_backbone.upper() == "DEFAULT" else enum.__members__.get(weights_backbone)
    if member is None:
        raise WeightsError(f"{name}'s backbone has no weights {weights_backbone!r}; choose one of "
                           f"{', '.join(['DEFAULT', 'none', *enum.__members__])}")
    return member


def _cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _reachable(url: str) -> bool:
    """Whether a HEAD request for ``url`` gets an answer (through the environment's proxies)."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT_S).close()
    except OSError:  # URLError, timeouts and refused connections are all OSErrors
        return False
    return True


def _build_pretrained(name: str, enum: Any, **kwargs: Any) -> nn.Module:
    """torchvision's own pretrained build (it handles each model's quirks), failing fast offline.

    ``enum`` is the model's weights, or (with ``weights_backbone=`` in ``kwargs``) its backbone's."""
    cached = _cache_path(enum.url)
    if not cached.exists() and not _reachable(enum.url):
        raise WeightsUnavailableError(
            f"cannot download {enum} (offline?) and it is not cached at {cached}; put the file "
            "there, or pass weights=\"none\" (untrained) or weights=PATH (a local file)"
        )
    check_cached(cached)
    try:
        with tensors_only():  # torchvision's own read would unpickle anything put in the cache
            return build_torchvision(name, **(kwargs or {"weights": enum}))
    except Exception as err:  # network, hash or format failure of the download
        raise WeightsUnavailableError(
            f"cannot get {enum} ({type(err).__name__}: {first_line(err, 160)}); cache: {cached}; "
            "or pass weights=\"none\" or weights=PATH"
        ) from err


def load_model(name: str, weights: str = "DEFAULT", *, num_classes: int | None = None,
               weights_backbone: str | None = None) -> nn.Module:
    """Build a torchvision (or ``timm/...``) model by name and load its weights.

    Args:
        name: a torchvision model name of any task (``gn_convert.list_models()``: classification,
            segmentation, detection, video), or ``timm/<architecture>[.<pretrained tag>]`` (needs the
            timm extra).
        weights: ``DEFAULT`` (torchvision's pretrained weights, downloaded or cached), a
            torchvision weights name, ``none`` (untrained), or a path to a local file.
        num_classes: classifier size for untrained weights or a local file with its own head.
        weights_backbone: for segmentation and detection models with ``weights="none"``: the backbone's
            pretrained weights (``DEFAULT`` or a name; downloaded or cached, failing fast offline), or
            None / ``none`` for an untrained backbone (the default: nothing is downloaded).

    Returns:
        The model in eval mode, on the CPU.

    Raises:
        UnknownModelError: ``name`` is not a torchvision classification model.
        WeightsError: the weights cannot be found, read, or do not fit.
        WeightsUnavailableError: DEFAULT weights offline and not cached.
    """
    spec = parse_weights(name, weights)
    if spec.kind == "torchvision":
        if num_classes is not None:
            raise WeightsError(f"num_classes=N does not apply to pretrained {spec.label}; "
                               "use a local weights file with its own head")
        return _build_pretrained(name, spec.enum).eval()
    if spec.kind == "timm":
        if num_classes is not None:
            raise WeightsError(f"num_classes=N does not apply to pretrained {name}; use a local weights file")
        return load_timm_pretrained(name, reachable=_reachable).eval()
    backbone = parse_backbone_weights(name, weights_backbone)
    if backbone is not None:
        if spec.kind != "none":
            raise WeightsError("weights_backbone applies to an untrained model (weights=\"none\"); the model's "
                               "own weights already hold its backbone")
        kwargs = {"weights_backbone": backbone, **({} if num_classes is None else {"num_classes": num_classes})}
        return _build_pretrained(name, backbone, **kwargs).eval()
    model = build_model(name, num_classes=num_classes, init_weights=spec.kind == "none")
    if spec.path is not None:  # a file
        load_weights_into(model, read_state_dict(spec.path), f"weights file {spec.path}")
    return model.eval()
