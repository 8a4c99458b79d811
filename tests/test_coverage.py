"""Coverage: one model of every torchvision family converts, exports and passes parity.

Runs the same per-model routine as ``scripts/sweep.py`` (which covers every model with
BatchNorm and writes models/CATALOG.md) on a fast subset, one model per family.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SWEEP = Path(__file__).resolve().parent.parent / "scripts" / "sweep.py"
FAMILIES = {
    "ResNet": "resnet18", "ResNeXt": "resnext50_32x4d", "MobileNetV2": "mobilenet_v2",
    "MobileNetV3": "mobilenet_v3_small", "EfficientNet": "efficientnet_b0", "RegNet": "regnet_y_400mf",
    "DenseNet": "densenet121", "ShuffleNet": "shufflenet_v2_x0_5", "MnasNet": "mnasnet0_5",
    "GoogLeNet": "googlenet", "VGG-BN": "vgg11_bn",
}


def _native_buildable() -> bool:
    from gn_convert.native import NativeBuildError, build_library

    try:
        build_library()
    except NativeBuildError as err:
        print(f"the native kernel is not checked here: {err}")
        return False
    return True


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("gn_sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(FAMILIES.values()), ids=list(FAMILIES))
def test_family_converts_exports_and_passes_parity(sweep, name: str, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    # the sweep also runs level "off"; the function file also runs on the native kernel here
    row = sweep.classification_row(name, tmp_path, levels=("all",), native=True)
    assert row["left_as_bn"] == 0 and row["bn_layers"] > 0
    for target in ("function", "inlined"):
        # random inputs within 1e-4 of torch; mean-1000 and scale-1000 inputs within 1e-3 or
        # twice torch float32's own error against float64 (gn_convert/parity/tolerances.py)
        assert row[f"{target}_passed"], row.get(f"{target}_failures")
        assert row[f"{target}_max_rel"] < 1e-2
    assert row["function_providers"] == (["cpu", "cpu-native"] if _native_buildable() else ["cpu"])
    assert not list(tmp_path.iterdir())  # the sweep leaves no exported file behind
