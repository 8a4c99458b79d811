"""Fidelity on unseen photos: ImageNet EfficientNet-Lite0 converted to GroupNorm and recovered.

Every figure is measured on crops of photos that no training step and no tuning decision saw: the
``test`` split of the development photo pool (``scripts/photo_pool.py``: 25 photographs from Debian
packages, 12 fixed views each). Training uses whole photos of the pool's ``train`` split, cropped
afresh at every step; recipe choices were tuned on its ``dev`` split only: ``--split dev`` scores
there (the pool's 10 dev photos and the 20 scikit-image/scikit-learn photos, 300 views) and keeps
its rows apart (``docs/fidelity_dev.json``).

A row is one recipe, one training-set size, one seed: ``recover`` within ``--budget`` wall seconds at
``--threads`` threads, then scored. Reported: top-1 agreement with the teacher and its bootstrap 95%
interval over test photos, agreement where the teacher is confident (top probability > 0.5),
top-5, KL(teacher || student); beside them what ``recover`` itself reported (its held-out split of
the training photos) and its fit (fresh views of the training photos), CPU and wall seconds, and
whether the run finished its planned work. ``--busy`` runs a CPU-heavy job (one core) beside the
seeds it names, as a loaded machine would.

Recipes (:data:`RECIPES`): ``zero-shot`` (data-free bn-stats init), ``opacus`` (weight 1, bias 0),
``recover`` (the library's defaults), and variants of the plan and the recipe.

Usage::

    python scripts/real_network_fidelity.py --recipes recover,recover-fidelity --seeds 0,1,2 --busy 2
    python scripts/real_network_fidelity.py --recipes recover --photos 6,12,25,50 --seeds 0
    python scripts/real_network_fidelity.py --split dev --recipes recover,recover-qdrop --budget 300
    python scripts/real_network_fidelity.py --report       # table and figure from the JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gn_convert
from gn_convert.fidelity.metrics import agreement_metrics, logits
from gn_convert.fidelity.recover.data import SeededViews
from gn_convert.fidelity.recover.engine import recover
from gn_convert.testing.photo_sets import HELDOUT_PHOTOS, TRAIN_PHOTOS, heldout_crops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study_models import efficientnet_lite0  # noqa: E402
from photo_pool import build_pool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = {"test": ROOT / "docs" / "fidelity_unseen.json", "dev": ROOT / "docs" / "fidelity_dev.json"}
FIGURE = ROOT / "docs" / "fidelity_unseen.png"
TEST_VIEWS = 12
DEV_BUNDLED_VIEWS = 180
"""Views of the 20 scikit-image/scikit-learn photos added to the dev split's 120."""
PLOT_BUDGET = 450.0
"""The budget of the runs the figure shows (the data-scaling rows)."""
RECIPES: dict[str, dict[str, Any]] = {
    "zero-shot": {"train": False},
    "zero-shot-k1": {"train": False, "min_channels_per_group": 1},
    "zero-shot-k16": {"train": False, "min_channels_per_group": 16},
    "opacus": {"train": False, "init": "identity", "min_channels_per_group": 1},
    "recover": {},
    "recover-bf16": {"cpu_bf16": True},
    "recover-k1": {"min_channels_per_group": 1},
    "recover-k4": {"min_channels_per_group": 4},
    "recover-k8": {"min_channels_per_group": 8},
    "recover-k16": {"min_channels_per_group": 16},
    "recover-fidelity": {"policy": "fidelity", "min_channels_per_group": 1},
    "recover-qdrop": {"stages": ("reconstruct", "distill"), "reconstruct_drop": 0.5, "reconstruct_allocate": "error"},
    "recover-invert": {"synthetic": 88, "synthetic_from": "photos", "synthetic_size": 128},
    "recover-lr3e-4": {"lr": 3e-4},
    "recover-fold-stem": {"fold": ("_bn0",)},
    "recover-kd-only": {"feature_weight": 0.0},
    "recover-fw0.1": {"feature_weight": 0.1},
}
"""Recipe name -> keyword arguments of ``recover`` (``train: False``: convert only, no data)."""


def test_set(pool: Path, teacher: nn.Module, split: str = "test") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Fixed views of every photo of ``split`` (dev: and of the bundled photos), the teacher's outputs on them
    and each view's photo."""
    files = sorted((pool / split).iterdir())
    views = SeededViews(files, TEST_VIEWS, 224, seed=1234)
    images = torch.stack([views[i][0] for i in range(len(views))])
    groups = [f.name for f in files for _ in range(TEST_VIEWS)]
    if split == "dev":
        bundled, names = heldout_crops(DEV_BUNDLED_VIEWS, names=TRAIN_PHOTOS + HELDOUT_PHOTOS)
        images, groups = torch.cat([images, bundled]), groups + names
    return images, logits(teacher, images), groups


def training_folder(pool: Path, photos: int | None, seed: int, scratch: Path) -> Path:
    """The pool's training photos, or a seeded subset of ``photos`` of them (links in ``scratch``)."""
    files = sorted((pool / "train").iterdir())
    if photos is None or photos >= len(files):
        return pool / "train"
    folder = scratch / f"train-{photos}-{seed}"
    folder.mkdir()
    for file in random.Random(seed).sample(files, photos):
        (folder / file.name).symlink_to(file)
    return folder


class Busy:
    """A CPU-heavy job beside the run (one process of matrix products), as a loaded machine has."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Busy:
        if self.on:
            code = "import numpy as n\na = n.random.rand(600, 600)\nwhile True: a = (a @ a) / 600"
            self.proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
        return self

    def __exit__(self, *_: Any) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def run_row(recipe: str, photos: int | None, seed: int, busy: bool, budget: float, pool: Path, teacher: nn.Module,
            test: tuple[torch.Tensor, torch.Tensor, list[str]], scratch: Path) -> dict[str, Any]:
    """One recipe, training-set size and seed: recover (or convert), then score on the test photos."""
    options = dict(RECIPES[recipe])
    row: dict[str, Any] = {"recipe": recipe, "photos": photos, "seed": seed, "busy": busy, "budget_s": budget}
    wall, cpu = time.perf_counter(), time.process_time()
    with Busy(busy):
        if options.pop("train", True):
            data = training_folder(pool, photos, seed, scratch)
            result = recover(teacher, data, budget=budget, seed=seed, **options)
            student = result.model
            row.update(reported=result.agreement, reported_kl=result.scores.get("kl"), fit=result.scores.get("fit"),
                       completed=result.completed, warnings=result.warnings, kept=result.kept,
                       stages=[{"name": s.name, "seconds": s.seconds, "agreement": s.agreement,
                                **{k: s.detail[k] for k in ("steps", "planned_steps", "stopped") if k in s.detail}}
                               for s in result.stages],
                       plan=result.plan.summary())
        else:
            student = gn_convert.convert(teacher, 32, **options)
    row.update(wall_s=round(time.perf_counter() - wall, 1), cpu_s=round(time.process_time() - cpu, 1))
    images, reference, groups = test
    row.update(agreement_metrics(logits(student, images), reference, groups))
    return row


def load_rows(split: str = "test") -> list[dict[str, Any]]:
    """The rows recorded so far."""
    return json.loads(RESULTS[split].read_text())["rows"] if RESULTS[split].exists() else []


def save_rows(rows: list[dict[str, Any]], pool: Path, split: str = "test") -> None:
    """Write the rows (atomically, strict JSON)."""
    from gn_convert import strict_json
    from gn_convert.atomic import atomic_file

    meta = {"pool": pool.name, "split": split, "photos": len(list((pool / split).iterdir())),
            "views_per_photo": TEST_VIEWS, "threads": torch.get_num_threads(), "torch": torch.__version__}
    if split == "dev":
        meta["bundled_views"] = DEV_BUNDLED_VIEWS
    with atomic_file(RESULTS[split]) as tmp:
        tmp.write_text(strict_json.dumps({"meta": meta, "rows": rows}, indent=1))


def _spread(given: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    values = [v for v in given if v is not None]
    if not values:
        return "-"
    mid = statistics.median(values) * scale
    if len(values) == 1:
        return f"{mid:.{digits}f}"
    return f"{mid:.{digits}f} ({min(values) * scale:.{digits}f}-{max(values) * scale:.{digits}f})"


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (recipe, photos), median and range over seeds."""
    head = ("| recipe | photos | budget s | runs | top-1 unseen (95% CI of median run) | confident | top-5 | KL "
            "| reported | fit | CPU s |\n| --- | ---: | ---: | ---: | --- | --- | --- | --- | --- | --- | ---: |")
    lines = [head]
    keys = sorted({(r["recipe"], r["photos"] or 0, r["budget_s"]) for r in rows},
                  key=lambda k: (list(RECIPES).index(k[0]), k[1], k[2]))
    for recipe, photos, budget in keys:
        group = [r for r in rows if (r["recipe"], r["photos"] or 0, r["budget_s"]) == (recipe, photos, budget)]
        middle = sorted(group, key=lambda r: r["top1"])[len(group) // 2]
        ci = f"[{100 * middle['top1_low']:.1f}-{100 * middle['top1_high']:.1f}]"
        lines.append(
            f"| {recipe} | {photos or '-'} | {budget:.0f} | {len(group)}{' (1 busy)' if any(r['busy'] for r in group) else ''} "
            f"| {_spread([r['top1'] for r in group])} {ci} | {_spread([r['confident'] for r in group])} "
            f"| {_spread([r['top5'] for r in group])} | {_spread([r['kl'] for r in group], 1, 2)} "
            f"| {_spread([r.get('reported') for r in group])} | {_spread([r.get('fit') for r in group])} "
            f"| {statistics.median(r['cpu_s'] for r in group):.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], all_photos: int, budget: float = PLOT_BUDGET) -> None:
    """Unseen-photo metrics against the number of training photos (``all_photos`` for rows that used them all),
    one line per recipe with at least two sizes, for the runs with ``budget`` seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for recipe in RECIPES:
        group = [r for r in rows if r["recipe"] == recipe and r["budget_s"] == budget]
        sizes = sorted({r["photos"] or all_photos for r in group})
        if len(sizes) < 2:
            continue
        for ax, key, scale in zip(axes, ("top1", "confident", "kl"), (100, 100, 1)):
            mids = [statistics.median(r[key] * scale for r in group if (r["photos"] or all_photos) == n) for n in sizes]
            ax.plot(sizes, mids, marker="o", label=recipe)
    for ax, title in zip(axes, ("top-1 agreement, unseen photos (%)", "confident crops (%)", "KL(teacher || student)")):
        ax.set_xscale("log")
        ax.set_xlabel("training photos (whole, cropped afresh)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("EfficientNet-Lite0 -> GroupNorm (G=32), recover within the same budget (median of the runs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="zero-shot,opacus,recover", help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--photos", default="all", help="training photos per run, e.g. 6,12,25,50 (default all)")
    parser.add_argument("--seeds", default="0", help="seeds, e.g. 0,1,2")
    parser.add_argument("--busy", default="", help="seeds that run beside a CPU-heavy job, e.g. 2")
    parser.add_argument("--budget", type=float, default=900.0, help="recover's budget in wall seconds (900)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the machine's cores)")
    parser.add_argument("--redo", action="store_true", help="run rows already recorded again")
    parser.add_argument("--split", choices=sorted(RESULTS), default="test",
                        help="score on the pool's test photos (default) or the dev photos used for tuning")
    parser.add_argument("--report", action="store_true", help="only print the table and write the figure")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    pool, rows = build_pool(), load_rows(args.split)
    if not args.report:
        teacher = efficientnet_lite0()
        test = test_set(pool, teacher, args.split)
        busy = {int(s) for s in args.busy.split(",") if s}
        sizes = [None] if args.photos == "all" else [int(n) for n in args.photos.split(",")]
        with tempfile.TemporaryDirectory(prefix="gn-study-") as scratch:
            for recipe in args.recipes.split(","):
                for photos in sizes:
                    for seed in (int(s) for s in args.seeds.split(",")):
                        key = (recipe, photos, seed, seed in busy, args.budget)
                        if not args.redo and any((r["recipe"], r["photos"], r["seed"], r["busy"], r["budget_s"]) == key
                                                 for r in rows):
                            continue
                        row = run_row(recipe, photos, seed, seed in busy, args.budget, pool, teacher, test,
                                      Path(scratch))
                        rows = [r for r in rows if (r["recipe"], r["photos"], r["seed"], r["busy"], r["budget_s"]) != key]
                        rows.append(row)
                        save_rows(rows, pool, args.split)
                        print(table([row]).splitlines()[-1], flush=True)
    print(table(rows))
    if args.split == "test":
        plot(rows, len(list((pool / "train").iterdir())))


if __name__ == "__main__":
    main()
