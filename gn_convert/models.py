"""Loading torchvision classification models by name, with their weights.

``weights`` is one of:

- ``"DEFAULT"`` (or a torchvision weights name such as ``"IMAGENET1K_V2"``): torchvision's
  weights API, its download and its cache (``$TORCH_HOME/hub/checkpoints``). Offline with the
  file not cached, loading fails at once with one line naming the cache path.
- ``"none"``: untrained (random) weights.
- a path to a local file: a state_dict, or a checkpoint dict holding one under a usual key
  (``state_dict``, ``model``, ...), saved with ``torch.save`` or as safetensors. It is read
  with ``torch.load(weights_only=True)``: no code in the file is ever run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from unittest import mock
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision import models as tvm

from .errors import UnknownModelError, WeightsError, WeightsUnavailableError
from .registry import is_batchnorm

log = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights", "net", "ema")
MAX_KEYS_SHOWN = 3


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights come from, and what torchvision knows about them.

    Attributes:
        architecture: the torchvision model name.
        weights: ``none``, a weights enum name (``ResNet50_Weights.IMAGENET1K_V2``) or a path.
        input_size: (H, W) the weights were evaluated at, from torchvision's meta.
        categories: class names when the weights carry them.
    """

    architecture: str
    weights: str
    input_size: tuple[int, int]
    categories: list[str] | None = None


def _classification_names() -> list[str]:
    return sorted(tvm.list_models(module=tvm))


def _build(name: str, **kwargs: Any) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # GoogLeNet/Inception init notices
        return tvm.get_model(name, **kwargs)


@contextlib.contextmanager
def _no_weight_init() -> Iterator[None]:
    """Make ``torch.nn.init`` a no-op: building a model only to inspect its layers is then cheap."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    with contextlib.ExitStack() as stack:
        for n in names:
            stack.enter_context(mock.patch.object(torch.nn.init, n, lambda t, *a, **k: t))
        yield


def build_model(name: str, *, num_classes: int | None = None, init_weights: bool = True) -> nn.Module:
    """Build an untrained torchvision model.

    Args:
        name: a torchvision classification model name.
        num_classes: classifier size (torchvision's default when None).
        init_weights: run the weight init; False is much faster when the weights are about to
            be overwritten (tensors are then uninitialised memory).
    """
    check_model_name(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if init_weights:
        return _build(name, **kwargs)
    with _no_weight_init():
        return _build(name, **kwargs)


def _has_batchnorm(name: str) -> bool:
    model = build_model(name, init_weights=False)
    return any(is_batchnorm(m) for m in model.modules())


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gn_convert"
    return root / f"batchnorm-models-torchvision-{torchvision.__version__}.json"


@functools.lru_cache(maxsize=1)
def list_models() -> list[str]:
    """The torchvision classification models that contain BatchNorm.

    Computed from torchvision by building each model (with weight init skipped), then cached on disk per torchvision version (``~/.cache/gn_convert``).

    Returns:
        Sorted model names.
    """
    cache = _cache_file()
    names = _classification_names()
    try:
        cached = json.loads(cache.read_text())
        if cached["all"] == names:
            return cached["batchnorm"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    found = [name for name in names if _has_batchnorm(name)]
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"all": names, "batchnorm": found}))
        os.replace(tmp, cache)
    except OSError as err:
        log.debug("cannot cache the model list: %s", err)
    return found


def check_model_name(name: str) -> None:
    """Raise :class:`UnknownModelError` unless ``name`` is a torchvision classification model."""
    names = _classification_names()
    if name not in names:
        close = [n for n in names if n.startswith(name[:4])][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}{hint}; `gn-convert list` shows the supported models"
        )


def default_weights_enum(name: str) -> Any:
    """torchvision's DEFAULT weights enum member for ``name`` (its meta needs no download)."""
    return tvm.get_model_weights(name).DEFAULT


def _resolve_enum(name: str, weights: str) -> Any:
    if weights.upper() == "DEFAULT":
        return default_weights_enum(name)
    enum = tvm.get_model_weights(name)
    member = weights.split(".")[-1]
    try:
        return enum[member]
    except KeyError:
        options = ", ".join(["DEFAULT", "none", *enum.__members__])
        raise WeightsError(
            f"{name} has no weights {weights!r} and no such file exists; choose one of {options} "
            "or a path to a weights file"
        ) from None


def _is_file_spec(weights: str) -> bool:
    return os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")) or Path(weights).exists()


def resolve_source(name: str, weights: str = "DEFAULT") -> ModelSource:
    """Describe where ``name``'s weights come from without loading them.

    Args:
        name: a torchvision classification model name.
        weights: ``DEFAULT``, a weights name, ``none`` or a file path.

    Returns:
        The :class:`ModelSource`.
    """
    check_model_name(name)
    default = default_weights_enum(name)
    size = tuple(default.transforms().crop_size) * 2
    input_size = (int(size[0]), int(size[1]))
    if weights.lower() == "none":
        return ModelSource(name, "none", input_size)
    if _is_file_spec(weights):
        return ModelSource(name, str(Path(weights).expanduser()), input_size)
    enum = _resolve_enum(name, weights)
    return ModelSource(name, f"{type(enum).__name__}.{enum.name}", input_size,
                       list(enum.meta.get("categories") or []) or None)


def _cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _build_pretrained(name: str, enum: Any) -> nn.Module:
    """torchvision's own pretrained build (it handles each model's quirks), failing fast offline."""
    cached = _cache_path(enum.url)
    if not cached.exists():
        host = urlparse(enum.url).hostname or ""
        try:
            socket.create_connection((host, 443), timeout=3).close()
        except OSError:
            raise WeightsUnavailableError(
                f"cannot download {enum} (offline?) and it is not cached at {cached}; put the file "
                "there, or pass --weights none (untrained) or --weights PATH (a local file)"
            ) from None
    try:
        return _build(name, weights=enum)
    except Exception as err:  # network, hash or format failure of the download
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise WeightsUnavailableError(
            f"cannot get {enum} ({type(err).__name__}: {first[:160]}); cache: {cached}; "
            "or pass --weights none or --weights PATH"
        ) from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from a local file, safely.

    Accepts a plain state_dict or a checkpoint dict holding one under a usual key, saved with
    ``torch.save`` (read with ``weights_only=True``) or as ``.safetensors``. A ``module.``
    prefix (from DataParallel/DDP) is stripped.

    Raises:
        WeightsError: the file is missing, unreadable, or holds no state_dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; pass an existing file, DEFAULT or none")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or pickles arbitrary objects
        raise WeightsError(
            f"cannot read weights file {path} ({type(err).__name__}): it is corrupt, truncated, or not "
            "a state_dict saved with torch.save or safetensors (only plain tensors are loaded)"
        ) from None
    state = _find_state_dict(data)
    if state is None:
        raise WeightsError(f"weights file {path} holds no state_dict (a dict of tensors, "
                           f"possibly under one of {', '.join(CHECKPOINT_KEYS)})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _find_state_dict(data: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return data
    if isinstance(data, dict):
        for key in CHECKPOINT_KEYS:
            found = _find_state_dict(data.get(key))
            if found is not None:
                return found
    return None


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` into ``model`` strictly, with one clear line on any mismatch.

    Raises:
        WeightsError: missing or unexpected keys, or shape mismatches (the first few named).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - MAX_KEYS_SHOWN} more)" if len(items) > MAX_KEYS_SHOWN else ""
            problems.append(f"{label}: {', '.join(items[:MAX_KEYS_SHOWN])}{more}")
    if problems:
        raise WeightsError(f"{origin} does not fit the model: {'; '.join(problems)}; "
                           "check the architecture name (and --num-classes)")
    model.load_state_dict(state, strict=True)


def load_model(name: str, weights: str = "DEFAULT", *, num_classes: int | None = None) -> nn.Module:
    """Build a torchvision classification model by name and load its weights.

    Args:
        name: a torchvision classification model name (``gn_convert.list_models()``).
        weights: ``DEFAULT`` (torchvision's pretrained weights, downloaded or cached), a
            torchvision weights name, ``none`` (untrained), or a path to a local file.
        num_classes: classifier size for untrained weights or a local file with its own head.

    Returns:
        The model in eval mode, on the CPU.

    Raises:
        UnknownModelError: ``name`` is not a torchvision classification model.
        WeightsError: the weights cannot be found, read, or do not fit.
        WeightsUnavailableError: DEFAULT weights offline and not cached.
    """
    source = resolve_source(name, weights)
    if source.weights == "none" or _is_file_spec(weights):
        model = build_model(name, num_classes=num_classes, init_weights=source.weights == "none")
        if source.weights != "none":
            load_weights_into(model, read_state_dict(source.weights), f"weights file {source.weights}")
        return model.eval()
    if num_classes is not None:
        raise WeightsError(f"--num-classes does not apply to pretrained {source.weights}; "
                           "use a local weights file with its own head")
    return _build_pretrained(name, _resolve_enum(name, weights)).eval()
