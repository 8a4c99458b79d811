"""Recovery throughput on the CPU: what a distillation step costs under each lever, in one run.

Two tables, both on ImageNet EfficientNet-Lite0 (the ``realnet`` extra) converted with G=32, at 224 px,
on random images (the cost of a step does not depend on what the pixels show):

1. **The step alone**, every lever in the same loop: the teacher's forward (no gradient), the
   student's forward and backward, KL, and an AdamW step. Variants: float32 (the baseline),
   channels-last, bfloat16 autocast on the CPU (where it runs natively: AVX-512-BF16 or AMX), both,
   ``torch.compile`` of the student (its compile time is reported apart: a budget pays it), and a larger
   batch. Images a second are what a budget buys.
2. **The library's distillation** (:func:`gn_convert.distill`, every loss and hook of a recovery): steps a
   second with ``channels_last=False`` (the layout before), the default (channels-last) and ``cpu_bf16``.

Fidelity at a fixed budget is measured by ``scripts/real_network_fidelity.py --split dev --budget 450
--recipes recover,recover-bf16``, against the code before at a fixed commit (docs/FIDELITY.md, "Recovery
throughput").

Usage::

    python scripts/recovery_throughput.py                  # both tables (about 6 minutes)
    python scripts/recovery_throughput.py --skip-compile   # without the torch.compile rows
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

import gn_convert
from gn_convert.data.sources import DataSplit
from gn_convert.fidelity.distill.layout import channels_last, cpu_bf16_supported, images_layout
from gn_convert.fidelity.distill.losses import kl_loss

# compile from cold, as a first recovery does: an empty cache of compiled kernels (a warm one made the first step 2-4 s)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="gn-throughput-inductor-")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _study_models import efficientnet_lite0  # noqa: E402

SIZE = 224
VARIANTS: dict[str, dict[str, Any]] = {
    "float32 (baseline)": {},
    "channels-last": {"channels_last": True},
    "bfloat16 autocast": {"bf16": True},
    "bfloat16 + channels-last": {"bf16": True, "channels_last": True},
    "torch.compile (student)": {"compile": True},
    "torch.compile + channels-last": {"compile": True, "channels_last": True},
    "channels-last, batch 32": {"channels_last": True, "batch": 32},
}
LIBRARY: dict[str, dict[str, Any]] = {
    "channels_last=False (before)": {"channels_last": False},
    "default (channels-last)": {},
    "cpu_bf16=True": {"cpu_bf16": True},
}


def time_loop(teacher: nn.Module, student: nn.Module, images: torch.Tensor, variant: dict[str, Any],
              steps: int, warmup: int) -> tuple[float, float]:
    """Median seconds of a step after ``warmup`` steps, and the seconds until the first step ended."""
    student, teacher = copy.deepcopy(student).train(), copy.deepcopy(teacher).eval()
    layout = variant.get("channels_last", False)
    batch = images_layout(images[: variant.get("batch", 16)], layout)
    started = time.perf_counter()
    with channels_last(student, teacher, enabled=layout):
        model = torch.compile(student) if variant.get("compile") else student
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        times, first = [], 0.0
        for k in range(warmup + steps):
            tick = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.get("bf16", False)):
                with torch.no_grad():
                    target = teacher(batch)
                out = model(batch)
            loss = kl_loss(out, target, 1.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - tick)
            if k == 0:
                first = time.perf_counter() - started
    return statistics.median(times[warmup:]), first


def time_library(teacher: nn.Module, student: nn.Module, images: torch.Tensor, options: dict[str, Any],
                 steps: int) -> float:
    """Median seconds between the progress callbacks of :func:`gn_convert.distill` (its first step left out)."""
    stamps: list[float] = []
    data = DataSplit(TensorDataset(images), None, False)
    gn_convert.distill(copy.deepcopy(student), teacher, data, steps=steps + 1, batch_size=16, eval_every=steps + 2,
                       feature_weight=1.0, callback=lambda _info: stamps.append(time.perf_counter()), **options)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps a variant (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the machine's cores)")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = efficientnet_lite0()
    images = torch.rand(64, 3, SIZE, SIZE)
    student = gn_convert.convert(teacher, 32, example_input=images[:2])
    print(f"EfficientNet-Lite0 at {SIZE} px, {args.threads} threads, torch {torch.__version__}, CPU bfloat16 "
          f"native: {cpu_bf16_supported()}")
    print("\n| step alone | batch | ms a step | images/s | x baseline images/s | first step s (compile) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    base = 0.0
    for name, variant in VARIANTS.items():
        if variant.get("compile") and args.skip_compile:
            continue
        seconds, first = time_loop(teacher, student, images, variant, args.steps, warmup=2)
        rate = variant.get("batch", 16) / seconds
        base = base or rate
        print(f"| {name} | {variant.get('batch', 16)} | {seconds * 1000:.0f} | {rate:.1f} | {rate / base:.2f} | "
              f"{first:.1f} |", flush=True)
    print("\n| gn_convert.distill (batch 16, GroupNorm-output loss on) | ms a step | steps/s | x before |")
    print("| --- | ---: | ---: | ---: |")
    before = 0.0
    for name, options in LIBRARY.items():
        seconds = time_library(teacher, student, images, options, args.steps)
        before = before or seconds
        print(f"| {name} | {seconds * 1000:.0f} | {1 / seconds:.2f} | {before / seconds:.2f} |", flush=True)
    shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


if __name__ == "__main__":
    main()
