"""Video recovery study: still clips or moving clips made from photos, scored on both.

Recovering a video model from a folder of photos needs clips; a still clip (a view repeated over 16
frames) has no motion, so distilling on it fits the temporal filters to zero motion only. A moving clip
(:func:`gn_convert.tasks.video.moving`: a camera that pans and zooms across the view) is the simplest
motion a real clip has. This study recovers the same converted model from the same photos with each,
within the same budget, and scores it against the teacher on held-out photos made into still clips and
into moving clips (other seeded motion than training drew).

No pretrained video weights can be downloaded here, so the teacher is torchvision's R3D-18 (10 classes)
with random weights whose BatchNorm layers were given a spread affine and running statistics measured on
moving clips of the training photos (``gn_convert.testing.bn_stats``): a network with a non-trivial function
of motion, not a trained one. Photos: the pool's ``train`` split to recover from, its ``test`` split scored
(``--fast``: the bundled scikit-image/scikit-learn photos).

Usage::

    python scripts/video_motion_study.py               # writes docs/video_motion_study.json
    python scripts/video_motion_study.py --fast
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study_photos import study_photos  # noqa: E402

from gn_convert import convert, recover  # noqa: E402
from gn_convert.atomic import atomic_file  # noqa: E402
from gn_convert.fidelity.metrics import agreement_metrics, logits  # noqa: E402
from gn_convert.tasks import TASKS  # noqa: E402
from gn_convert.tasks.video import moving, still  # noqa: E402
from gn_convert.testing.bn_stats import estimate_batchnorm_stats, randomize_batchnorm_affine  # noqa: E402
from gn_convert.testing.photo_sets import normalise  # noqa: E402
from gn_convert.testing.shape_masks import random_crop  # noqa: E402

log = logging.getLogger("video_motion_study")
FRAMES = 16
SPREAD = 3.0
"""Standard deviation of the teacher's logits over the clips its classifier was standardised on."""


def crops(photos: list[Any], count: int, size: int, seed: int) -> torch.Tensor:
    """``count`` random square crops (uint8 -> [0, 1]) of the photos in turn, ``(count, 3, size, size)``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picked = [random_crop(photos[k % len(photos)], size, rng) for k in range(count)]
    return torch.from_numpy(np.stack(picked)).permute(0, 3, 1, 2).float().div(255.0)


def teacher_model(train: torch.Tensor, seed: int) -> nn.Module:
    """R3D-18 (10 classes), random weights, BatchNorm affine spread and statistics measured on moving clips,
    and a classifier that reads the pooled features standardised on those clips (a random network's pooled
    features barely move from clip to clip: every clip would get the same class, and KL 0 would prove nothing)."""
    torch.manual_seed(seed)
    model = TASKS["video"].build("r3d_18", num_classes=10)
    randomize_batchnorm_affine(model, seed=seed)
    clips = moving(normalise(train), FRAMES, torch.Generator().manual_seed(seed + 7))
    estimate_batchnorm_stats(model, clips.split(8))
    model.eval()
    pooled: list[torch.Tensor] = []
    pool, classifier = model.get_submodule("avgpool"), model.get_submodule("fc")
    assert isinstance(classifier, nn.Linear)
    handle = pool.register_forward_hook(lambda m, i, out: pooled.append(out.flatten(1)))
    with torch.no_grad():
        for batch in clips.split(8):
            model(batch)
    handle.remove()
    features = torch.cat(pooled)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed + 11)
    weight = torch.randn(10, features.shape[1], generator=gen) * SPREAD / features.shape[1] ** 0.5 / std
    with torch.no_grad():
        classifier.weight.copy_(weight)
        classifier.bias.copy_(-(weight @ mean))
    return model


def scores(student: nn.Module, teacher_out: dict[str, torch.Tensor], clips: dict[str, torch.Tensor],
           groups: list[str]) -> dict[str, float]:
    """KL and top-1 agreement with the teacher on each held-out clip set."""
    found: dict[str, float] = {}
    for name, data in clips.items():
        metrics = agreement_metrics(logits(student, data, 8), teacher_out[name], groups, resamples=500)
        found.update({f"{name}_kl": metrics["kl"], f"{name}_top1": metrics["top1"],
                      f"{name}_top1_low": metrics["top1_low"], f"{name}_top1_high": metrics["top1_high"]})
    return found


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Teacher, students, scores: the study's document."""
    start = time.perf_counter()
    train_photos, eval_photos, source = study_photos(args.fast, args.eval_split)
    train = crops(train_photos, args.train_images, args.size, seed=0)
    heldout = normalise(crops(eval_photos, args.eval_images, args.size, seed=1))
    groups = [str(k % len(eval_photos)) for k in range(args.eval_images)]
    teacher = teacher_model(train[:args.stats_images], args.seed)
    clips = {"still": still(heldout, FRAMES), "moving": moving(heldout, FRAMES, torch.Generator().manual_seed(99))}
    teacher_out = {name: logits(teacher, data, 8) for name, data in clips.items()}
    rows = [{"model": "bn-stats init (no recovery)", **scores(convert(teacher, args.groups), teacher_out, clips,
                                                               groups)}]
    recovery: dict[str, Any] = {}
    video = TASKS["video"]
    with tempfile.TemporaryDirectory(prefix="gn-video-study-") as scratch:
        folder = Path(scratch) / "photos"
        folder.mkdir()
        for k, image in enumerate(train):
            Image.fromarray((image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()).save(folder / f"{k:04d}.png")
        for motion in (False, True):
            video.motion = motion  # type: ignore[attr-defined]
            try:
                result = recover(copy.deepcopy(teacher), str(folder), budget=args.budget, input_size=args.size,
                                 batch_size=args.batch, groups=args.groups, seed=args.seed, holdout=args.holdout)
            finally:
                video.motion = False  # type: ignore[attr-defined]
            name = f"recovered on {'moving' if motion else 'still'} clips"
            recovery[name] = result.to_dict()
            log.info("%s\n%s", name, result.summary())
            steps = next((s.detail.get("steps") for s in result.stages if s.name == "distill"), None)
            rows.append({"model": name, "steps": steps, **scores(result.model, teacher_out, clips, groups)})
    return {"source": source, "config": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows,
            "recovery": recovery, "seconds": time.perf_counter() - start, "torch": torch.__version__}


def table(rows: Sequence[dict[str, Any]]) -> str:
    """KL and top-1 agreement (95% interval over photos) on still and on moving held-out clips."""
    lines = ["| model | distil steps | KL, still | top-1, still | KL, moving | top-1, moving |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = [f"{r[f'{kind}_kl']:.4f} | {r[f'{kind}_top1']:.3f} [{r[f'{kind}_top1_low']:.2f}-"
                 f"{r[f'{kind}_top1_high']:.2f}]" for kind in ("still", "moving")]
        lines.append(f"| {r['model']} | {r.get('steps') or '-'} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the study, print its table, write ``video_motion_study.json`` under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    parser.add_argument("--fast", action="store_true", help="bundled photos, small budget")
    parser.add_argument("--eval-split", choices=("test", "dev"), default="test")
    parser.add_argument("--size", type=int, default=64, help="clip side in pixels (default 64)")
    parser.add_argument("--train-images", type=int, default=300, help="photo crops to recover from")
    parser.add_argument("--stats-images", type=int, default=64, help="crops the teacher's statistics come from")
    parser.add_argument("--eval-images", type=int, default=100)
    parser.add_argument("--budget", type=float, default=300.0, help="each recovery's budget in seconds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--groups", type=int, default=32)
    parser.add_argument("--holdout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.fast:
        args.train_images, args.stats_images, args.eval_images, args.budget, args.size = 48, 16, 24, 30.0, 32
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("gn_convert").setLevel(logging.WARNING)
    document = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / ("video_motion_study_fast.json" if args.fast else "video_motion_study.json")
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(document, indent=1, default=float) + "\n")
    print(f"{document['source']}; {args.eval_images} held-out crops as {FRAMES}-frame clips of {args.size} px; "
          f"{document['seconds']:.0f} s")
    print(table(document["rows"]))
    print(f"wrote {out}")
    return document


if __name__ == "__main__":
    main()
