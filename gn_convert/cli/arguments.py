"""Option groups shared by several subcommands, and the helpers that turn them into API calls.

Choices come from the API's own maps (``POLICIES``, ``INITS``, ``FITS``, ``ORDERS``, ``TARGETS``,
``TRAINABLE``), so the CLI never keeps a second list; they are read through
:class:`~gn_convert.cli.choices.LazyChoices`, so that building the parser imports no torch. Each
such option's default is the API's own (the map's first name; ``tests/test_cli_startup.py`` checks
that they agree).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from gn_convert.cli.choices import LazyChoices
from gn_convert.cli.console import CONSOLE

DEFAULT_GROUPS = 32
DEFAULT_MIN_CHANNELS = 16
"""Channels per group a ``--groups`` request keeps at least (:data:`gn_convert.surgery.group_count.DEFAULT_MIN_CHANNELS`)."""
FIDELITY = "fidelity"
"""``--policy fidelity`` (:data:`gn_convert.surgery.plan.FIDELITY`)."""
POLICY_CHOICES = LazyChoices("gn_convert.surgery.plan:POLICIES")
INIT_CHOICES = LazyChoices("gn_convert.surgery.initialize:INITS")
FIT_CHOICES = LazyChoices("gn_convert.fidelity.calibrate.moments:FITS")
ORDER_CHOICES = LazyChoices("gn_convert.fidelity.calibrate.engine:ORDERS")
TRAINABLE_CHOICES = LazyChoices("gn_convert.fidelity.distill.options:TRAINABLE")
TARGET_CHOICES = LazyChoices("gn_convert.onnx.targets:TARGETS")


def fraction(text: str) -> float:
    """An argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1); a fraction such as 0.1")
    return value


def duration(text: str) -> float:
    """An argparse type: seconds, written ``900``, ``90s``, ``15m`` or ``1h``."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; write 900, 90s, 15m or 1h") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"the duration must be positive, got {text!r}")
    return seconds


def stderr_sink(text: str) -> None:
    """Where stage progress goes: stderr, through the console (log lines and bars on lines of their own), only on
    rank 0 under torchrun."""
    if is_main_process():
        CONSOLE.stage(text)


def is_main_process() -> bool:
    """Rank 0 under torchrun (or a single process): the only one that prints and writes."""
    return int(os.environ.get("RANK", "0")) == 0


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """The group-plan options shared by every command that converts."""
    g = parser.add_argument_group("group plan (which GroupNorm replaces each BatchNorm)")
    g.add_argument("--groups", "-g", type=int, metavar="G",
                   help=f"a target, not a promise (default {DEFAULT_GROUPS}): by default every layer keeps at least "
                   f"{DEFAULT_MIN_CHANNELS} channels per group, so narrower layers get fewer groups (at 32, ResNet-50 "
                   "gets 4, 8 or 16 on 31 of its 53 layers); --min-channels-per-group 1 gives G on every layer")
    g.add_argument("--group-size", type=int, metavar="K", help="channels per group, instead of --groups")
    g.add_argument("--min-channels-per-group", type=int, metavar="K",
                   help=f"the smallest group any layer may get (default {DEFAULT_MIN_CHANNELS} with --groups, 1 with "
                   "--group-size; 1 forces G on every layer, as Wu & He's G=32)")
    g.add_argument("--policy", choices=POLICY_CHOICES, default="divisor", metavar="POLICY",
                   help="%(choices)s: when the groups do not divide a layer's channels: largest divisor <= G "
                   "(divisor, default), gcd(G, C), or refuse (strict); fidelity (with --recover): per layer, "
                   "the count up to G that keeps its output closest to BatchNorm's, measured on --data")
    g.add_argument("--init", choices=INIT_CHOICES, default="bn-stats", metavar="INIT",
                   help="%(choices)s: GroupNorm affine init: from the BatchNorm statistics (default) or identity")
    g.add_argument("--include", action="append", metavar="PATTERN",
                   help="convert only layers whose name matches (fnmatch; repeatable)")
    g.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="leave layers whose name matches as BatchNorm (fnmatch; repeatable)")
    g.add_argument("--fold", action="append", metavar="PATTERN",
                   help="fold matching BatchNorm layers into the convolution before them instead of converting them "
                   "(exact; for layers you will not train, e.g. 'features.[0-5].*'; fnmatch; repeatable)")
    g.add_argument("--skip-unsupportable", action="store_true",
                   help="leave layers whose groups would hold one value as BatchNorm, instead of failing")
    g.add_argument("--allow-no-bn", action="store_true",
                   help="accept a model without BatchNorm (a no-op) instead of failing")


def plan_kwargs(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict[str, Any]:
    """The keyword arguments of :func:`gn_convert.plan` from parsed options.

    ``--groups`` and ``--group-size`` exclude each other (``parser.error`` when both are given).
    """
    if args.groups is not None and args.group_size is not None and parser is not None:
        parser.error("--groups and --group-size exclude each other; give one")
    groups = args.groups if args.groups is not None else (None if args.group_size else DEFAULT_GROUPS)
    return dict(groups=groups, group_size=args.group_size, policy=args.policy,
                min_channels_per_group=args.min_channels_per_group, include=args.include,
                exclude=args.exclude, fold=args.fold, on_single="skip" if args.skip_unsupportable else "error",
                allow_no_bn=args.allow_no_bn)


def add_recover_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--recover`` (:func:`gn_convert.recover`)."""
    g = parser.add_argument_group("fidelity: recovery (one budgeted call that brings the function back)")
    g.add_argument("--recover", action="store_true",
                   help="bring the converted model back to the original's function on --data (a folder, or "
                   "'synthetic' for images synthesised from the teacher) within --budget")
    g.add_argument("--budget", type=duration, default=900.0, metavar="TIME",
                   help="time for the recovery: 900, 15m, 1h (default 15m)")
    g.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="add N images synthesised from the teacher's BatchNorm statistics (256 with --data synthetic)")
    g.add_argument("--synthetic-dir", type=Path, metavar="DIR", help="also write the synthetic images there as PNG files")
    g.add_argument("--state-dir", type=Path, metavar="DIR",
                   help="keep the recovery's state there (after each stage and during distillation)")
    g.add_argument("--resume", action="store_true", help="continue a stopped --recover from --state-dir")


def recover_kwargs(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> dict[str, Any] | None:
    """The keyword arguments of :func:`gn_convert.recover`, or None without ``--recover``.

    ``--policy fidelity`` needs ``--recover``, and ``--recover`` needs ``--data``. The group plan
    options, ``--init``, ``--lr``, ``--batch-size`` and ``--feature-weight`` are passed on as
    given; ``--calibrate`` and ``--finetune-steps`` are refused (recover runs its own stages).
    """
    if not args.recover:
        if args.policy == FIDELITY and parser is not None:
            parser.error("--policy fidelity measures layers on data: add --recover and --data")
        return None
    if args.data is None and parser is not None:
        parser.error("--recover needs --data DIR (a folder of images) or --data synthetic")
    if (args.calibrate or args.steps) and parser is not None:
        parser.error("--recover runs its own distillation within --budget: drop --calibrate and --finetune-steps")
    if args.resume and args.state_dir is None and parser is not None:
        parser.error("--resume continues from --state-dir DIR: give the folder of the stopped run")
    data = "synthetic" if str(args.data) == "synthetic" and not args.data.exists() else args.data
    from gn_convert.fidelity.recover.data import (
        check_heldout,  # the API's rule for --holdout, before any loading
    )

    check_heldout(data, args.holdout, args.eval_data)
    kwargs = plan_kwargs(args, parser)
    kwargs.pop("allow_no_bn")
    found = dict(data=data, init=args.init, budget=args.budget, lr=args.lr, synthetic=args.synthetic,
                 synthetic_dir=args.synthetic_dir, seed=args.seed, holdout=args.holdout, input_size=args.input_size,
                 eval_data=args.eval_data, checkpoint_dir=args.state_dir, resume=args.resume, **kwargs)
    if args.batch_size is not None:
        found["batch_size"] = args.batch_size
    if args.feature_weight is not None:
        found["feature_weight"] = args.feature_weight
    return found


def add_target_argument(group: Any, flag: str) -> None:
    """``--target``/``--onnx-target`` with the export targets as choices."""
    group.add_argument(flag, choices=TARGET_CHOICES, default="function", metavar="TARGET",
                       help="ONNX form: %(choices)s (default %(default)s; see `gn-convert export -h`)")


def add_native_library_argument(group: Any) -> None:
    """``--native-library PATH``: the kernel library to use or ship."""
    group.add_argument("--native-library", type=Path, metavar="PATH",
                       help="the native kernel library to use or ship (the path `gn-convert native` printed, "
                       "e.g. built with --march for the server); default: build one here (for this CPU; for a "
                       "Triton repository, for a portable -march)")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data options shared by ``finetune`` and ``convert`` (recovery, calibration, distillation)."""
    g = parser.add_argument_group("fidelity: data (for --recover, --calibrate and distillation)")
    g.add_argument("--data", type=Path, metavar="DIR", help="folder of images (plain, unlabelled) or of class "
                   "subfolders (labelled) for calibration and distillation")
    g.add_argument("--eval-data", type=Path, metavar="DIR",
                   help="separate held-out folder (default: --holdout of --data)")
    g.add_argument("--holdout", type=fraction, default=0.1, metavar="F",
                   help="fraction of --data held out for evaluation (0.1)")
    g.add_argument("--input-size", type=int, metavar="PX", help="input side in pixels: the crops of --data, and the "
                   "example, export and parity inputs (default: the model's preset)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the split, data order and augmentation (0)")
    g.add_argument("--workers", type=int, default=0, metavar="N", help="data-loading worker processes (0)")
    g.add_argument("--no-flip", action="store_true", help="no horizontal flips in training augmentation")


def add_distill_arguments(parser: argparse.ArgumentParser, steps_flag: str = "--steps",
                          default_steps: int | None = 200) -> None:
    """The calibration and distillation options shared by ``finetune`` and ``convert`` (the data options
    are :func:`add_data_arguments`)."""
    g = parser.add_argument_group("fidelity: calibration and distillation by step count")
    g.add_argument("--calibrate", type=int, default=0, metavar="N",
                   help="calibrate the GroupNorm affines on N batches of --data first (default 0: off)")
    g.add_argument("--calibrate-method", choices=FIT_CHOICES, default="variance", metavar="FIT",
                   help="calibration fit: %(choices)s (default %(default)s)")
    g.add_argument("--calibrate-order", choices=ORDER_CHOICES, default="greedy", metavar="ORDER",
                   help="calibration order: %(choices)s (default greedy, the best measured; independent is one "
                   "cheap pass)")
    g.add_argument(steps_flag, dest="steps", type=int, default=default_steps, metavar="N",
                   help=f"distillation steps (default {default_steps or 0})")
    g.add_argument("--batch-size", type=int, metavar="N", help="global batch per step (32; with --recover 16)")
    g.add_argument("--accumulate", type=int, default=1, metavar="N", help="micro-batches per step per process (1)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate, also of --recover (1e-4; "
                   "try 1e-2 with --trainable gn-affine)")
    g.add_argument("--trainable", choices=TRAINABLE_CHOICES, default="all", metavar="WHICH",
                   help="parameters to train: %(choices)s (default %(default)s)")
    g.add_argument("--gn-lr-scale", type=float, default=1.0, metavar="X", help="lr multiplier of GroupNorm affines (1)")
    g.add_argument("--temperature", type=float, default=2.0, metavar="T", help="KL temperature (2)")
    g.add_argument("--ce-weight", type=float, default=0.0, metavar="W", help="cross-entropy weight with labels (0: off)")
    g.add_argument("--feature-weight", type=float, metavar="W",
                   help="GroupNorm-output loss weight (0: off; with --recover 1)")
    g.add_argument("--eval-every", type=int, default=25, metavar="N", help="steps between held-out evaluations (25)")
    g.add_argument("--target-agreement", type=float, metavar="F",
                   help="stop once held-out agreement reaches this (0-1)")


def fidelity_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`gn_convert.fidelity.stage.run_fidelity`; empty when
    neither calibration nor distillation is asked for."""
    if not (args.calibrate or args.steps):
        return {}
    return dict(data=args.data, calibrate_batches=args.calibrate, calibrate_method=args.calibrate_method,
                calibrate_order=args.calibrate_order, steps=args.steps,
                batch_size=32 if args.batch_size is None else args.batch_size,
                seed=args.seed, holdout=args.holdout, input_size=args.input_size, lr=args.lr,
                trainable=args.trainable, gn_lr_scale=args.gn_lr_scale, temperature=args.temperature,
                ce_weight=args.ce_weight, feature_weight=args.feature_weight or 0.0, eval_every=args.eval_every,
                target_agreement=args.target_agreement, eval_data=args.eval_data, accumulate=args.accumulate,
                flip=not args.no_flip, num_workers=args.workers)


class ProgressBar:
    """A tqdm bar driven by :func:`gn_convert.distill`'s callback, opened at the first step
    (so errors before training print alone) and only on rank 0."""

    def __init__(self, total: int, label: str = "distilling") -> None:
        self.total, self.label = total, label
        self.bar: Any = None
        self.enabled = is_main_process()

    def __call__(self, info: Any) -> None:
        """Show the step, the loss and the last measured agreement (a :class:`StepInfo`)."""
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = CONSOLE.open_bar(lambda: tqdm(total=self.total, initial=info.step - 1, desc=self.label,
                                                     unit="step", dynamic_ncols=True))
        self.bar.n = info.step
        shown = {"loss": f"{info.loss:.4f}"}
        if info.agreement is not None:
            shown["agree"] = f"{info.agreement:.3f}"
        self.bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        """Close the bar if it was opened."""
        if self.bar is not None:
            self.bar.close()


class BudgetBar:
    """A tqdm bar over a time budget, for ``--recover``: it advances with the seconds spent and shows
    what the last progress event was (a synthesis batch, a fitted block, a distillation step)."""

    def __init__(self, budget: float, label: str = "recovering") -> None:
        import time

        self.budget, self.label, self.clock = budget, label, time.perf_counter
        self.bar: Any = None
        self.start = self.clock()
        self.enabled = is_main_process()

    def __call__(self, info: Any) -> None:
        """Advance to the seconds spent; show the event (its class name and step, when it has one)."""
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = CONSOLE.open_bar(lambda: tqdm(
                total=round(self.budget), desc=self.label, unit="s", dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s {postfix}"))
        self.bar.n = min(round(self.clock() - self.start), round(self.budget))
        step = getattr(info, "step", None)
        shown = {"stage": getattr(info, "stage", type(info).__name__)}
        if step is not None:
            shown["step"] = str(step)
        self.bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        """Close the bar if it was opened."""
        if self.bar is not None:
            self.bar.close()


def fidelity_lines(report: dict[str, Any]) -> list[str]:
    """What the CLI prints of a fidelity report (calibration summary, distillation result)."""
    lines = []
    cal = report.get("calibration")
    if cal:
        worst = min((layer for layer in cal["layers"] if layer["fitted"]), key=lambda layer: layer["r2"], default=None)
        tail = f", worst {worst['name']} {worst['r2']:.3f}" if worst else ""
        if worst is not None and worst["r2"] < 0:
            tail += " (below 0: that layer's GroupNorm discards what its BatchNorm output carried)"
        lines.append(f"calibrated ({cal['method']}, {cal['order']}) on {cal['samples']} images: "
                     f"mean R^2 {cal['mean_r2']:.3f}{tail}")
    fine = report.get("finetune")
    if fine:
        last = fine["history"][-1] if fine["history"] else {}
        acc = "" if last.get("accuracy") is None else f", accuracy {last['accuracy']:.3f}"
        teacher = "" if fine.get("teacher_accuracy") is None else f" (teacher {fine['teacher_accuracy']:.3f})"
        early = " (target reached)" if fine["stopped_early"] else ""
        lines.append(f"distilled {fine['steps']} steps{early}: held-out agreement "
                     f"{last.get('agreement', float('nan')):.3f}{acc}{teacher} on {fine['heldout']} images")
    return lines
