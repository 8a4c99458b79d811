"""timm classification models by name: ``timm/<architecture>[.<pretrained tag>]``.

``gn-convert timm/resnet50.a1_in1k`` and ``gn_convert.load_model("timm/resnet50.a1_in1k")``
build the model with ``timm.create_model``. Weights: ``DEFAULT`` (timm's pretrained weights for
the tag, from the Hugging Face hub or its cache; offline with nothing cached, loading fails at
once naming the cache), ``none`` (untrained) or a path to a local file. timm is an optional
dependency (``pip install "gn-convert[timm]"``); nothing here imports it before a timm name is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from torch import nn

from gn_convert.errors import ExtraMissingError, UnknownModelError, WeightsUnavailableError, first_line

PREFIX = "timm/"


def is_timm_name(name: str) -> bool:
    """Whether ``name`` asks for a timm model (``timm/...``)."""
    return name.startswith(PREFIX)


def timm_module() -> ModuleType:
    """The ``timm`` package, or :class:`ExtraMissingError` saying how to install it."""
    try:
        import timm
    except ImportError:
        raise ExtraMissingError('timm models need timm: pip install "gn-convert[timm]"') from None
    return timm


def check_timm_name(name: str) -> None:
    """Raise :class:`UnknownModelError` unless ``name`` is ``timm/<a timm model>[.<a pretrained tag>]``."""
    timm = timm_module()
    model = name[len(PREFIX):]
    architecture, _, tag = model.partition(".")
    if not timm.is_model(architecture):
        close = timm.list_models(f"{architecture[:4]}*")[:5]
        hint = f" (did you mean {', '.join(PREFIX + c for c in close)}?)" if close else ""
        raise UnknownModelError(f"unknown timm model {architecture!r}{hint}; timm.list_models() lists them")
    if tag and model not in timm.list_pretrained(model):
        tags = timm.list_pretrained(f"{architecture}.*")[:6]
        raise UnknownModelError(f"timm has no pretrained tag {tag!r} for {architecture}; "
                                f"choose one of {', '.join(PREFIX + t for t in tags) or 'none (untrained only)'}")


def build_timm(name: str, *, num_classes: int | None = None, pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` for ``timm/...`` (weights initialised, or pretrained)."""
    check_timm_name(name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model: nn.Module = timm_module().create_model(name[len(PREFIX):], pretrained=pretrained, **kwargs)
    return model


@dataclass(frozen=True)
class TimmPreset:
    """timm's pretrained config in the shape of a torchvision weights enum member: ``transforms()``
    gives crop, resize, mean, std and interpolation; ``meta`` the class names when known."""

    config: Any

    def transforms(self) -> SimpleNamespace:
        """The evaluation preprocessing timm's config describes."""
        from torchvision.transforms import InterpolationMode

        crop = int(self.config.input_size[-1])
        crop_pct = float(self.config.crop_pct or 0.875)
        interpolation = {"bicubic": InterpolationMode.BICUBIC, "nearest": InterpolationMode.NEAREST}.get(
            self.config.interpolation, InterpolationMode.BILINEAR)
        return SimpleNamespace(crop_size=[crop], resize_size=[int(round(crop / crop_pct))],
                               mean=list(self.config.mean), std=list(self.config.std), interpolation=interpolation)

    @property
    def meta(self) -> dict[str, Any]:
        names = self.config.label_names
        return {"categories": list(names)} if names else {}


def timm_preset(name: str) -> TimmPreset:
    """The pretrained config of ``timm/...`` (for an architecture without a tag, timm's default one)."""
    timm = timm_module()
    check_timm_name(name)
    model = name[len(PREFIX):]
    config = timm.models.get_pretrained_cfg(model)
    if config is None:  # an architecture without pretrained weights: timm's own defaults
        config = SimpleNamespace(input_size=(3, 224, 224), crop_pct=0.875, interpolation="bilinear",
                                 mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), label_names=None)
    return TimmPreset(config)


def _cached(config: Any) -> Path | None:
    """Where timm would read the pretrained file from, when it is already cached; else None."""
    if getattr(config, "hf_hub_id", None):
        from huggingface_hub import try_to_load_from_cache

        for filename in (config.hf_hub_filename, "model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if filename:
                found = try_to_load_from_cache(config.hf_hub_id, filename)
                if isinstance(found, str):
                    return Path(found)
    if getattr(config, "url", None):
        import torch

        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(config.url)
        return path if path.exists() else None
    return None


def cache_location(config: Any) -> str:
    """Where a user puts the pretrained file by hand (the hub cache, or torch's for URL weights)."""
    if getattr(config, "hf_hub_id", None):
        from huggingface_hub.constants import HF_HUB_CACHE

        return f"{HF_HUB_CACHE}/models--{config.hf_hub_id.replace('/', '--')}"
    import torch

    return f"{torch.hub.get_dir()}/checkpoints"


def load_timm_pretrained(name: str, *, reachable: Any) -> nn.Module:
    """``timm/...`` with its pretrained weights, failing at once when offline and not cached.

    Args:
        name: ``timm/<architecture>[.<tag>]``.
        reachable: ``reachable(url) -> bool``, the offline probe.

    Raises:
        WeightsUnavailableError: no pretrained weights for the name, or offline and not cached.
    """
    config = timm_preset(name).config
    url = (f"https://huggingface.co/{config.hf_hub_id}" if getattr(config, "hf_hub_id", None)
           else getattr(config, "url", None))
    if not url:
        raise WeightsUnavailableError(f"timm has no pretrained weights for {name}; pass weights=\"none\" or weights=PATH")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if _cached(config) is None and (offline or not reachable(url)):
        raise WeightsUnavailableError(
            f"cannot download timm weights for {name} (offline?) and they are not cached under "
            f"{cache_location(config)}; put them there, or pass weights=\"none\" (untrained) or weights=PATH")
    try:
        return build_timm(name, pretrained=True)
    except Exception as err:  # network, hash or format failure of the download
        raise WeightsUnavailableError(f"cannot get timm weights for {name} ({type(err).__name__}: "
                                      f"{first_line(err, 160)}); cache: {cache_location(config)}; "
                                      "or pass weights=\"none\" or weights=PATH") from err
