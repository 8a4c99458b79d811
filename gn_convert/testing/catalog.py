"""The models the catalog sweeps run over: torchvision's classification models with BatchNorm and a
section of timm's, one or more per family (untrained weights)."""

from __future__ import annotations

TIMM_CATALOG = tuple(f"timm/{name}" for name in (
    "resnet18", "resnet34", "resnet50", "resnet50d", "resnet101", "resnext50_32x4d", "seresnet50",
    "wide_resnet50_2", "resnetrs50", "resnest14d", "efficientnet_b0", "efficientnet_b2", "efficientnet_lite0",
    "tf_efficientnet_b0", "efficientnetv2_rw_s", "tf_efficientnetv2_b0", "mixnet_s", "mobilenetv2_100",
    "mobilenetv3_small_050", "mobilenetv3_large_100", "tf_mobilenetv3_large_100", "lcnet_050", "ghostnet_100",
    "regnetx_002", "regnetx_016", "regnety_002", "regnety_016", "regnetz_b16", "cspresnet50", "cspresnext50",
    "cspdarknet53", "cs3darknet_s", "darknet53", "densenet121", "dla34", "dpn68", "rexnet_100", "hrnet_w18_small",
    "selecsls42b", "tresnet_m"))
"""timm's BatchNorm classification models by family (untrained weights): the catalog's timm section."""


def catalog_names(timm: bool = True) -> list[str]:
    """Every torchvision classification model with BatchNorm, then (with ``timm``) :data:`TIMM_CATALOG`."""
    from gn_convert.load.names import list_models

    return [*list_models("classification"), *(TIMM_CATALOG if timm else ())]
