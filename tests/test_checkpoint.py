"""Saving a converted model and rebuilding it from the saved folder alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import gn_convert
from gn_convert.errors import CheckpointError
from gn_convert.testing.photos import photo_crops


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_round_trip_is_bit_identical(tmp_path: Path, fmt: str, nontrivial) -> None:
    teacher = nontrivial("mobilenet_v3_small")
    plan = gn_convert.plan(teacher, 32)
    student = gn_convert.convert(teacher, plan=plan).eval()
    gn_convert.save(student, tmp_path / "ckpt", plan=plan, architecture="mobilenet_v3_small",
                    source_weights="none", weights_format=fmt)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["format"] == "gn-convert/1" and config["gn_convert_version"] == gn_convert.__version__
    assert len(config["plan"]["layers"]) == len(plan.layers)
    rebuilt = gn_convert.load_converted(tmp_path / "ckpt")
    x = photo_crops(3, 64, seed=1)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), student(x))
    # the two files, and the manifest that lists them as gn-convert's (what --force and clean-up may remove)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([".gn-convert", "config.json", f"model.{fmt}"])


def test_custom_module_round_trip(tmp_path: Path) -> None:
    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 12, 3), nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 8, 1), nn.BatchNorm2d(8))

    plan = gn_convert.plan(make(), 4)
    student = gn_convert.convert(make(), plan=plan)
    gn_convert.save(student, tmp_path / "c", plan=plan)
    with pytest.raises(CheckpointError, match="custom model"):
        gn_convert.load_converted(tmp_path / "c")
    rebuilt = gn_convert.load_converted(tmp_path / "c", model=make())
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(rebuilt(x), student.eval()(x))


def test_broken_checkpoints_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a gn-convert checkpoint"):
        gn_convert.load_converted(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        gn_convert.load_converted(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not written by gn-convert"):
        gn_convert.load_converted(tmp_path)


def test_truncated_weights_are_refused(tmp_path: Path) -> None:
    model = gn_convert.load_model("resnet18", "none")
    plan = gn_convert.plan(model, 32)
    gn_convert.save(gn_convert.convert(model, plan=plan), tmp_path, plan=plan, architecture="resnet18")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        gn_convert.load_converted(tmp_path)
