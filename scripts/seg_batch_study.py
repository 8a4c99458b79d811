"""Segmentation batch-size study: a pretrained BatchNorm network against its GroupNorm conversion, 2 to 32 a batch.

The dense-task companion of ``scripts/batch_size_study.py`` (issue 30, item 4; the protocol, the
tuning and the results are in docs/BATCH_SIZE.md, "Segmentation"). Shapes with exact masks are
drawn onto real photos (``gn_convert.testing.shape_masks``): training images from the photo pool's
``train`` photos, scored images from its ``test`` photos (``--eval-split dev`` for tuning; ``--fast``
uses the scikit-image/scikit-learn photos). EfficientNet-Lite0 with its ImageNet weights, cut at
stride 16, with torchvision's LR-ASPP head, is fine-tuned from the same weights as BN (BatchNorm in
train mode), BN-frozen (the pretrained BatchNorm layers in eval mode), GN
(``gn_convert.convert(model, 32)``, the default plan) and GN-G32 (``min_channels_per_group=1``), at
each batch size with the same samples in the same order, the learning rate linear in the batch
(``scripts/_study_protocol.py``). Scored by mean IoU, BatchNorm with its running statistics. The
memory part measures a training step per image at high resolution (``scripts/_study_memory.py``).

Usage::

    python scripts/seg_batch_study.py            # full study, writes docs/seg_batch_study.{png,json}
    python scripts/seg_batch_study.py --fast     # one seed, few steps, small images (the test runs this)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _seg_models import Lite0Segmenter, TorchvisionScores  # noqa: E402
from _study_memory import GIB, memory_probe, memory_rows, memory_table  # noqa: E402
from _study_protocol import crossings, sample_order, seed_stats, train_linear_scaled  # noqa: E402

from gn_convert import convert  # noqa: E402
from gn_convert.atomic import atomic_file  # noqa: E402
from gn_convert.testing.bn_stats import estimate_batchnorm_stats  # noqa: E402
from gn_convert.testing.photo_sets import HELDOUT_PHOTOS, TRAIN_PHOTOS, normalise  # noqa: E402
from gn_convert.testing.shape_masks import (  # noqa: E402
    CLASSES,
    build_shape_set,
    bundled_photos,
    confusion,
    folder_photos,
    mean_iou,
    pixel_accuracy,
)

log = logging.getLogger("seg_batch_study")

VARIANTS: tuple[str, ...] = ("BN", "BN-frozen", "GN", "GN-G32")
REFERENCE_BATCH = 32
REFERENCE_MODEL = "DeepLabV3-R50"  # torchvision's deeplabv3_resnet50, for the memory part


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines one study (learning rate and epochs were chosen on the dev photos).

    Attributes:
        batch_sizes: images per batch to compare.
        seeds: one run per seed, variant and batch size (the seed sets the head and the order).
        variants: which of :data:`VARIANTS` to run.
        photos: ``pool`` (the development photo pool) or ``bundled`` (scikit-image/scikit-learn).
        eval_split: the pool's split that is scored: ``test``, or ``dev`` while tuning.
        size: image side in pixels.
        train_images, eval_images: images drawn for training and for scoring.
        epochs: passes over the training images (the same samples for every batch size).
        lr: SGD learning rate at batch 32 of each variant (linear in the batch): the best on the dev
            photos at batch 32 of those tried (docs/BATCH_SIZE.md).
        weight_decay: SGD weight decay.
        groups: GroupNorm groups asked of ``convert``.
        precise_bn_images: training images that BN's statistics are recomputed on.
        memory_sizes: image sides of the memory measurement.
        memory_probe: also measure a training step's peak memory in child processes.
        reference_sizes: image sides at which :data:`REFERENCE_MODEL`'s memory is measured.
    """

    batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32)
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = VARIANTS
    photos: str = "pool"
    eval_split: str = "test"
    size: int = 96
    train_images: int = 1200
    eval_images: int = 300
    epochs: float = 2.0
    lr: dict[str, float] = field(default_factory=lambda: {"BN": 0.1, "BN-frozen": 0.003, "GN": 0.001, "GN-G32": 0.03})
    weight_decay: float = 4e-5
    groups: int = 32
    precise_bn_images: int = 512
    memory_sizes: tuple[int, ...] = (512, 1024)
    memory_probe: bool = True
    reference_sizes: tuple[int, ...] = (512,)

    @classmethod
    def fast(cls, seed: int = 0) -> StudyConfig:
        """The test's version: bundled photos, 64 px, 96 training images, three batch sizes, no child processes."""
        return cls(batch_sizes=(2, 8, 32), seeds=(seed,), photos="bundled", size=64, train_images=96,
                   eval_images=48, epochs=2.0, precise_bn_images=64, memory_sizes=(128, 256),
                   memory_probe=False, reference_sizes=(64,))


@dataclass
class SegData:
    """Training and scored images (uint8, N x 3 x S x S) with their label maps, and where they come from."""

    images: torch.Tensor
    labels: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor
    source: str

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised training images and labels at ``index``."""
        return normalise(self.images[index].float() / 255.0), self.labels[index]


def make_data(cfg: StudyConfig) -> SegData:
    """Draw the training set from the training photos and the scored set from the held-out photos."""
    if cfg.photos == "bundled":
        train_photos, eval_photos = bundled_photos(TRAIN_PHOTOS), bundled_photos(HELDOUT_PHOTOS)
        source = f"scikit-image/scikit-learn photos: {len(train_photos)} train, {len(eval_photos)} held out"
    else:
        from photo_pool import build_pool

        pool = build_pool()
        train_photos, eval_photos = folder_photos(pool / "train"), folder_photos(pool / cfg.eval_split)
        source = f"photo pool {pool.name}: {len(train_photos)} train photos, {len(eval_photos)} {cfg.eval_split} photos"
    sets = [build_shape_set(photos, count, cfg.size, seed=seed)
            for photos, count, seed in ((train_photos, cfg.train_images, 0), (eval_photos, cfg.eval_images, 1))]
    tensors = [(torch.from_numpy(s.images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(s.labels).long())
               for s in sets]
    return SegData(*tensors[0], *tensors[1], source)


def starting_points(cfg: StudyConfig, base: nn.Module) -> dict[str, nn.Module]:
    """Each variant's model: copies of ``base`` (BN, BN-frozen) or its conversions (GN, GN-G32)."""
    models: dict[str, nn.Module] = {}
    for variant in cfg.variants:
        if variant.startswith("BN"):
            models[variant] = copy.deepcopy(base)
        else:
            models[variant] = convert(base, cfg.groups, min_channels_per_group=1 if variant == "GN-G32" else None)
    return models


@torch.no_grad()
def score(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean IoU, pixel accuracy) of ``model`` in eval mode on uint8 ``images``."""
    model.eval()
    matrix = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    for chunk, target in zip(images.split(32), labels.split(32)):
        matrix += confusion(model(normalise(chunk.float() / 255.0)).argmax(1), target)
    return mean_iou(matrix), pixel_accuracy(matrix)


@dataclass
class Run:
    """One training run: what was run, its held-out mean IoU and pixel accuracy (in [0, 1]), BN's mean IoU
    with recomputed statistics (None for the others), its steps and its wall time (orientation only)."""

    variant: str
    batch_size: int
    seed: int
    miou: float
    pixel_accuracy: float
    miou_precise_bn: float | None
    steps: int
    seconds: float


def one_run(variant: str, model: nn.Module, data: SegData, cfg: StudyConfig, batch_size: int, seed: int) -> Run:
    """Fine-tune ``model`` at ``batch_size`` and score it."""
    order = sample_order(len(data.labels), int(cfg.epochs * len(data.labels)), seed)
    start = time.perf_counter()
    backbone = nn.ModuleList([model.get_submodule("stem"), model.get_submodule("blocks")])  # not the new head
    train_linear_scaled(model, data.batch, order, batch_size=batch_size, lr=cfg.lr[variant],
                        reference_batch=REFERENCE_BATCH, weight_decay=cfg.weight_decay,
                        frozen_bn=backbone if variant == "BN-frozen" else None)
    seconds = time.perf_counter() - start
    miou, accuracy = score(model, data.eval_images, data.eval_labels)
    precise = None
    if variant == "BN":
        chunks = torch.arange(min(cfg.precise_bn_images, len(data.labels))).split(REFERENCE_BATCH)
        recomputed = estimate_batchnorm_stats(copy.deepcopy(model), (data.batch(c)[0] for c in chunks))
        precise = score(recomputed, data.eval_images, data.eval_labels)[0]
    log.info("%-9s batch %2d seed %d: mIoU %.3f, pixel accuracy %.3f%s (%d steps, %.0f s)", variant, batch_size,
             seed, miou, accuracy, "" if precise is None else f", precise BN mIoU {precise:.3f}",
             len(order) // batch_size, seconds)
    return Run(variant, batch_size, seed, miou, accuracy, precise, len(order) // batch_size, seconds)


def run_study(cfg: StudyConfig, data: SegData) -> list[Run]:
    """Every (seed, batch size, variant) of the study, one :class:`Run` each."""
    runs: list[Run] = []
    for seed in cfg.seeds:
        torch.manual_seed(1000 + seed)
        base = Lite0Segmenter(len(CLASSES))
        for batch_size in cfg.batch_sizes:
            models = starting_points(cfg, base)
            runs.extend(one_run(v, models[v], data, cfg, batch_size, seed) for v in cfg.variants)
    return runs


def summarize(runs: Sequence[Run], variants: Sequence[str]) -> list[dict]:
    """Mean IoU over seeds (mean, std, min, max) and mean pixel accuracy, per variant and batch size."""
    rows = []
    for variant in variants:
        for batch_size in sorted({r.batch_size for r in runs}):
            group = [r for r in runs if (r.variant, r.batch_size) == (variant, batch_size)]
            precise = [r.miou_precise_bn for r in group if r.miou_precise_bn is not None]
            rows.append({"variant": variant, "batch_size": batch_size, "seeds": len(group),
                         **{f"miou_{k}": v for k, v in seed_stats([r.miou for r in group]).items()},
                         "pixel_accuracy_mean": seed_stats([r.pixel_accuracy for r in group])["mean"],
                         "miou_precise_bn_mean": seed_stats(precise)["mean"] if precise else None})
    return rows


def _model_for_memory(name: str) -> nn.Module:
    """``BN`` or ``GN`` (the study's model and its default conversion), or ``DeepLabV3-R50`` (torchvision's)."""
    if name == REFERENCE_MODEL:
        return TorchvisionScores(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=len(CLASSES))).train()
    model = Lite0Segmenter(len(CLASSES))
    return model.train() if name == "BN" else convert(model, 32).train()


def measure_memory(cfg: StudyConfig) -> list[dict]:
    """Training memory per image of BN and GN at ``cfg.memory_sizes`` (with the peak of a step in child processes
    when ``cfg.memory_probe``), and of :data:`REFERENCE_MODEL` at ``cfg.reference_sizes`` (saved activations
    at batch 2: its image-pooling BatchNorm refuses batch 1 in training)."""
    probe = Path(__file__).resolve() if cfg.memory_probe else None
    return (memory_rows(_model_for_memory, ("BN", "GN"), cfg.memory_sizes, probe, len(CLASSES))
            + memory_rows(_model_for_memory, (REFERENCE_MODEL,), cfg.reference_sizes, None, len(CLASSES), batch=2))


COLOURS = {"BN": "#1f77b4", "BN-frozen": "#2ca02c", "GN": "#d62728", "GN-G32": "#ff7f0e", REFERENCE_MODEL: "#7f7f7f"}
LABELS = {"BN": "BN (train mode)", "BN-frozen": "BN frozen (eval mode)",
          "GN": "GN (convert, default plan)", "GN-G32": "GN, 32 groups on every layer"}


def plot(summary: Sequence[dict], memory: Sequence[dict], path: Path, title: str, floor: float) -> None:
    """Mean IoU against batch size (log2 axis, bars min-max over seeds; ``floor``: the all-background score),
    and memory per image against resolution; written atomically to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for variant in dict.fromkeys(r["variant"] for r in summary):
        rows = sorted((r for r in summary if r["variant"] == variant), key=lambda r: r["batch_size"])
        x, mean = [r["batch_size"] for r in rows], [r["miou_mean"] for r in rows]
        error = [[m - r["miou_min"] for m, r in zip(mean, rows)], [r["miou_max"] - m for m, r in zip(mean, rows)]]
        left.errorbar(x, mean, yerr=error, color=COLOURS[variant], marker="o", capsize=3, linewidth=2,
                      label=LABELS[variant])
        if variant == "BN":
            left.plot(x, [r["miou_precise_bn_mean"] for r in rows], color=COLOURS[variant], linestyle=":",
                      marker=".", label="BN, statistics recomputed")
    left.set_xscale("log", base=2)
    sizes = sorted({r["batch_size"] for r in summary})
    left.set_xticks(sizes, [str(b) for b in sizes])
    left.axhline(floor, color="black", linestyle="--", linewidth=1, label="background everywhere")
    left.set(xlabel="batch size (images per batch)", ylabel="held-out mean IoU", title=title)
    left.set_ylim(floor - 0.05, max(r["miou_max"] for r in summary) + 0.15)
    left.grid(alpha=0.3)
    left.legend(fontsize=7, ncol=2, loc="upper center")
    for variant in dict.fromkeys(r["variant"] for r in memory):
        rows = [r for r in memory if r["variant"] == variant]
        sides = [r["size"] for r in rows]
        right.plot(sides, [r["saved_bytes"] / GIB for r in rows], color=COLOURS[variant], marker="o",
                   label=f"{variant}: saved activations")
        if all(r["peak_step_bytes"] for r in rows):
            right.plot(sides, [r["peak_step_bytes"] / GIB for r in rows], color=COLOURS[variant], marker="s",
                       linestyle="--", label=f"{variant}: peak of a training step")
        for r in rows if variant != "GN" else ():  # GN's numbers are BN's within a few percent
            last = len(sides) > 1 and r["size"] == max(sides)
            right.annotate(f"{r['fits']['16']} fit in 16 GiB", (r["size"], r["saved_bytes"] / GIB), fontsize=7,
                           xytext=(-6 if last else 6, -10), textcoords="offset points", color=COLOURS[variant],
                           ha="right" if last else "left")
    right.set_xscale("log", base=2)
    right.set_xticks(sorted({r["size"] for r in memory}), [f"{s}²" for s in sorted({r["size"] for r in memory})])
    right.set_ylim(bottom=0)
    right.set(xlabel="image size (pixels)", ylabel="GiB per image", title="training memory per image (CPU)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def table(summary: Sequence[dict], variants: Sequence[str]) -> str:
    """Markdown: one row per batch size, mean IoU (x100) mean ± std over seeds per variant."""
    lines = ["| batch | " + " | ".join(variants) + " | BN, precise stats |",
             "| ---: |" + " ---: |" * (len(variants) + 1)]
    for batch_size in sorted({r["batch_size"] for r in summary}):
        cells = {r["variant"]: r for r in summary if r["batch_size"] == batch_size}
        text = [f"{100 * cells[v]['miou_mean']:.1f} ± {100 * cells[v]['miou_std']:.1f}" for v in variants]
        precise = cells["BN"]["miou_precise_bn_mean"] if "BN" in cells else None
        text.append("-" if precise is None else f"{100 * precise:.1f}")
        lines.append(f"| {batch_size} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs",
                        help="folder for the PNG and JSON (default: the repository's docs/)")
    parser.add_argument("--fast", action="store_true", help="one seed, few steps, small images (for the test)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; --fast: 0)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="batch sizes (default 2 4 8 16 32)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="variants (default all)")
    parser.add_argument("--lr", type=float, help="learning rate at batch 32 of every variant (default: each its own)")
    parser.add_argument("--size", type=int, help="image side in pixels (default 96)")
    parser.add_argument("--epochs", type=float, help="passes over the training images (default 2)")
    parser.add_argument("--eval-split", choices=("test", "dev"), help="pool split to score (default test)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--memory-only", action="store_true",
                        help="measure the memory again, keeping the runs of the JSON under --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("NORM", "SIZE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the study, print its tables, write ``seg_batch_study.{png,json}`` under ``--out``; returns the summary."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(memory_probe(_model_for_memory(args.memory_probe[0]), int(args.memory_probe[1]), len(CLASSES)))
        return []
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gn_convert").setLevel(logging.WARNING)
    cfg = StudyConfig.fast() if args.fast else StudyConfig()
    options: dict[str, Any] = {"seeds": args.seeds, "batch_sizes": args.batch_sizes, "variants": args.variants,
                               "lr": None if args.lr is None else dict.fromkeys(VARIANTS, args.lr),
                               "size": args.size, "epochs": args.epochs, "eval_split": args.eval_split}
    changes: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items() if v is not None}
    cfg = replace(cfg, **changes)
    out = args.out / "seg_batch_study.json"
    if args.memory_only:  # keep the runs, measure the memory again
        document = json.loads(out.read_text())
        document["memory"] = measure_memory(cfg)
        return report(document, args.out)
    start = time.perf_counter()
    data = make_data(cfg)
    log.info("%s; %d training and %d scored images of %d px", data.source, len(data.labels), len(data.eval_labels),
             cfg.size)
    runs = run_study(cfg, data)
    summary = summarize(runs, cfg.variants)
    memory = [] if args.no_memory else measure_memory(cfg)
    crossing = {f"{gn}/{bn}": crossings(summary, gn, bn) for gn in ("GN", "GN-G32") for bn in ("BN", "BN-frozen")
                if {gn, bn} <= set(cfg.variants)}
    return report({"config": asdict(cfg), "data": data.source, "summary": summary, "crossings": crossing,
                   "memory": memory, "background_share": float((data.eval_labels == 0).float().mean()),
                   "runs": [asdict(r) for r in runs], "seconds": time.perf_counter() - start,
                   "torch": torch.__version__}, args.out)


def report(document: dict, out: Path) -> list[dict]:
    """Write the study's JSON and figure under ``out``, print its tables; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "seg_batch_study.json") as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n")
    summary, memory, variants = document["summary"], document["memory"], document["config"]["variants"]
    seeds = document["config"]["seeds"]
    plot(summary, memory, out / "seg_batch_study.png",
         f"shapes on held-out photos, Lite0 + LR-ASPP ({len(seeds)} seeds, bars min-max)",
         document["background_share"] / len(CLASSES))
    print(f"held-out mean IoU x100, mean ± std over seeds {list(seeds)} ({document['data']}); {document['seconds']:.0f} s")
    print(table(summary, variants))
    print("curves cross at batch " + "; ".join(f"{k}: {', '.join(f'{x:.1f}' for x in v) or 'none'}"
                                               for k, v in document["crossings"].items()))
    if memory:
        print(memory_table(memory))
    print(f"wrote {out / 'seg_batch_study.png'} and {out / 'seg_batch_study.json'}")
    return summary


if __name__ == "__main__":
    main()
