"""Fidelity study: how much of a BatchNorm network's function survives conversion to GroupNorm,
and how much calibration on data and a short distillation bring back.

Protocol (real data that ships in a package; no download):

- Train the digits teacher (``gn_convert.testing.digits``): torchvision's ResNet-18 with
  BatchNorm on scikit-learn's digits, 1,400 training and 397 held-out digits at 32x32.
- Convert it to GroupNorm (G=32 by default) with each init: ``identity`` (weight 1, bias 0, as
  Opacus does), ``bn-stats`` (data-free, from the running statistics), and ``bn-stats``
  followed by each calibration variant on 16 batches of 32 training digits (no labels).
- Distil from ``bn-stats`` (and from the greedy calibration) on the unlabelled training digits:
  KL at temperature 2, batch 32, AdamW with 5% warmup and cosine decay over ``--steps``; the
  held-out agreement and accuracy are read every 25 steps of that one run.
- Print one table: held-out top-1 accuracy, top-1 agreement with the teacher, and wall time.

Usage::

    python scripts/fidelity.py                 # the full study (several minutes on 2 cores)
    python scripts/fidelity.py --fast          # 16x16, 3 epochs, 100 steps
    python scripts/fidelity.py --json out.json # also write the rows as JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import torch

from gn_convert import calibrate, convert, distill
from gn_convert.testing.digits import predictions, train_digits_teacher

CALIBRATIONS = (("variance", "independent"), ("least-squares", "independent"),
                ("variance", "sequential"), ("least-squares", "sequential"), ("variance", "greedy"))
DISTILLATIONS = {
    "all params, lr 1e-4": dict(lr=1e-4),
    "GN affine only, lr 1e-2": dict(lr=1e-2, trainable="gn-affine"),
    "all params, lr 1e-3": dict(lr=1e-3),
}


def _row(stage: str, model: torch.nn.Module, teacher: Any, seconds: float, steps: int = 0) -> dict[str, Any]:
    images, labels = teacher.data.heldout.tensors
    student, reference = predictions(model, images), predictions(teacher.model, images)
    return {"stage": stage, "steps": steps, "accuracy": float((student == labels).float().mean()),
            "agreement": float((student == reference).float().mean()), "seconds": round(seconds, 1)}


def _inits(teacher: Any, groups: int, batches: int) -> list[dict[str, Any]]:
    rows = []
    for init in ("identity", "bn-stats"):
        start = time.perf_counter()
        model = convert(teacher.model, groups, init=init)
        rows.append(_row(f"init: {init}", model, teacher, time.perf_counter() - start))
    for method, order in CALIBRATIONS:
        model = convert(teacher.model, groups)
        report = calibrate(model, teacher.model, teacher.data.train, batches=batches, method=method, order=order)
        label = "greedy (init / variance / least-squares)" if order == "greedy" else f"{method}, {order}"
        rows.append(_row(f"calibrated: {label}", model, teacher, report.seconds))
    return rows


def _distillations(teacher: Any, groups: int, steps: int, batches: int) -> list[dict[str, Any]]:
    rows = []
    runs: list[tuple[str, str, Any]] = [(name, "bn-stats", kwargs) for name, kwargs in DISTILLATIONS.items()]
    runs.append(("all params, lr 1e-4", "greedy calibration", dict(lr=1e-4)))
    for name, init, kwargs in runs:
        model = convert(teacher.model, groups)
        if init != "bn-stats":
            calibrate(model, teacher.model, teacher.data.train, batches=batches, order="greedy")
        result = distill(model, teacher.model, teacher.data, steps=steps, eval_every=25, **kwargs)
        for point in result.history[1:]:
            rows.append({"stage": f"distilled from {init}: {name}", "steps": point.step,
                         "accuracy": point.accuracy, "agreement": point.agreement,
                         "seconds": round(point.seconds, 1)})
    return rows


def main() -> None:
    """Run the study and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32, help="digit side in pixels (32)")
    parser.add_argument("--epochs", type=int, default=6, help="teacher training epochs (6)")
    parser.add_argument("--groups", type=int, default=32, help="GroupNorm groups (32)")
    parser.add_argument("--steps", type=int, default=200, help="distillation steps (200)")
    parser.add_argument("--batches", type=int, default=16, help="calibration batches of 32 (16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--fast", action="store_true", help="16x16, 3 epochs, 100 steps")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.fast:
        args.size, args.epochs, args.steps = 16, 3, 100
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    teacher = train_digits_teacher(args.epochs, size=args.size)
    rows: list[dict[str, Any]] = [{"stage": "teacher (BatchNorm)", "steps": 0, "accuracy": teacher.accuracy, "agreement": 1.0,
             "seconds": round(teacher.seconds, 1)}]
    rows += _inits(teacher, args.groups, args.batches)
    rows += _distillations(teacher, args.groups, args.steps, args.batches)
    print(f"digits ResNet-18, {args.size}x{args.size}, GN{args.groups}, {args.threads} thread(s); "
          f"teacher {args.epochs} epochs; held-out: 397 digits")
    print("| stage | steps | held-out accuracy | agreement with teacher | wall s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['stage']} | {row['steps']} | {100 * row['accuracy']:.1f}% | "
              f"{100 * row['agreement']:.1f}% | {row['seconds']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
