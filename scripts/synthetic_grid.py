"""A grid of images synthesised from EfficientNet-Lite0's BatchNorm statistics (docs/synthetic_grid.png).

What ``gn_convert.recover(model, "synthetic")`` sees when a user has no data: images optimised
so that every BatchNorm layer's batch statistics match its running ones, under jitter, flip,
total-variation and L2 priors (:mod:`gn_convert.fidelity.synthesize.engine`). Needs the realnet extra.

Usage: ``python scripts/synthetic_grid.py [--count 32] [--size 96] [--budget 240]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from gn_convert.fidelity.synthesize.engine import grid, synthesize

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "synthetic_grid.png")
    args = parser.parse_args()
    from _study_models import efficientnet_lite0
    from PIL import Image

    images, report = synthesize(efficientnet_lite0(), args.count, size=args.size, batch_size=32, steps=300,
                                budget_s=args.budget)
    picture = (grid(images, columns=8) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(picture).save(args.out)
    print(f"wrote {args.out}: {report.images} images at {report.size} px in {report.seconds:.0f} s; "
          f"worst BatchNorm statistics error {report.worst_stat_error:.3f}, median "
          f"{sorted(report.stat_error.values())[len(report.stat_error) // 2]:.3f}")


if __name__ == "__main__":
    main()
