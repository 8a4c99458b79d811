"""What DP-readiness costs: time and memory of a DP-SGD step, and how a DP-ready model saves and loads.

Each variant runs in its own process (peak memory is the process's), on the same converted model
(torchvision, untrained, G=8), batch and input size, Opacus's PrivacyEngine with the same noise and
clipping; the median of the timed steps after one warm-up step:

- ``sgd``: a plain (non-private) SGD step of the unchanged converted model: the floor;
- ``copies``: ``make_dp_ready`` (a copy of each hooked module's output, taken only under hooks),
  Opacus's default ``hooks`` mode;
- ``ew``: the unchanged model under Opacus's ``grad_sample_mode="ew"`` (expanded weights: no module
  hooks, so no in-place conflict; early beta in Opacus);
- ``functorch``: the DP-ready model under ``grad_sample_mode="functorch"``;
- ``unchanged-hooks``: the unchanged model in ``hooks`` mode, which fails at its first step.

Then: ``make_dp_ready``'s own time (its proof on copies), ``load_converted`` of a DP-ready checkpoint
against a plain one, and a whole-model ``torch.save``/``torch.load`` round trip.

Usage::

    python scripts/dp_ready_cost.py --model resnet18 --batch 16 --size 64 --steps 6
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

VARIANTS = ("sgd", "copies", "ew", "functorch", "unchanged-hooks")


def _converted(name: str) -> nn.Module:
    import gn_convert
    from gn_convert.load.names import build_model

    torch.manual_seed(0)
    return gn_convert.convert(build_model(name, num_classes=10).eval(), 8).train()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(variant: str, name: str, batch: int, size: int, steps: int) -> dict[str, Any]:
    """Time ``steps`` training steps of one variant (in this process)."""
    from opacus import PrivacyEngine

    from gn_convert.surgery.dp import make_dp_ready

    model = _converted(name)
    if variant in ("copies", "functorch"):
        model = make_dp_ready(model, torch.randn(2, 3, size, size))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch * (steps + 1), 3, size, size, generator=gen), torch.randint(0, 10, (batch * (steps + 1),))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    if variant != "sgd":
        mode = {"copies": "hooks", "unchanged-hooks": "hooks"}.get(variant, variant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, loader = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                grad_sample_mode=mode, poisson_sampling=False)
    before = _peak_mb()
    times = []
    try:
        for xb, yb in loader:
            start = time.perf_counter()
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            times.append(time.perf_counter() - start)
    except RuntimeError as err:
        return {"variant": variant, "error": str(err).splitlines()[0][:120]}
    timed = sorted(times[1:])
    return {"variant": variant, "step_ms": 1000 * timed[len(timed) // 2], "peak_mb": _peak_mb(),
            "training_mb": _peak_mb() - before}


def save_and_load(name: str, size: int) -> dict[str, Any]:
    """make_dp_ready's time; load_converted of a DP-ready checkpoint against a plain one; a pickle round trip."""
    import gn_convert
    from gn_convert.surgery.dp import is_dp_ready, make_dp_ready

    plain = _converted(name)
    example = torch.randn(2, 3, size, size)
    start = time.perf_counter()
    ready = make_dp_ready(copy.deepcopy(plain), example)
    result: dict[str, Any] = {"make_dp_ready_s": time.perf_counter() - start}
    plan = gn_convert.plan(_converted_source(name), 8)
    with tempfile.TemporaryDirectory() as folder:
        for label, model, flag in (("plain", plain, False), ("dp_ready", ready, True)):
            out = Path(folder) / label
            gn_convert.save(model, out, plan=plan, architecture=name, model_kwargs={"num_classes": 10},
                            extra={"input_size": [size, size], "dp_ready": flag})
            start = time.perf_counter()
            loaded = gn_convert.load_converted(out)
            result[f"load_{label}_s"] = time.perf_counter() - start
            result[f"load_{label}_is_dp_ready"] = is_dp_ready(loaded)
    buffer = io.BytesIO()
    torch.save(ready, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        same = torch.equal(again.eval()(example), ready.eval()(example))
    result.update(pickle_mb=buffer.getbuffer().nbytes / 2**20, pickle_round_trip_equal=same,
                  pickle_round_trip_dp_ready=is_dp_ready(again))
    return result


def _converted_source(name: str) -> nn.Module:
    from gn_convert.load.names import build_model

    torch.manual_seed(0)
    return build_model(name, num_classes=10).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one variant, in a child process
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.model, args.batch, args.size, args.steps)))
        return
    rows: list[dict[str, Any]] = []
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, __file__, "--variant", variant, "--model", args.model,
                                "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
                                "--threads", str(args.threads)], capture_output=True, text=True, check=False)
        lines = child.stdout.strip().splitlines()
        rows.append(json.loads(lines[-1]) if lines else {"variant": variant, "error": child.stderr[-200:]})
    floor = float(next(r for r in rows if r["variant"] == "sgd")["step_ms"])
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, median of "
          f"{args.steps - 1} steps")
    print(f"{'variant':18s} {'step ms':>9s} {'x sgd':>7s} {'peak MB':>9s} {'training MB':>12s}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:18s} fails: {row['error']}")
            continue
        print(f"{row['variant']:18s} {row['step_ms']:9.0f} {float(row['step_ms']) / floor:7.2f} "
              f"{row['peak_mb']:9.0f} {row['training_mb']:12.0f}")
    for key, value in save_and_load(args.model, args.size).items():
        print(f"{key:28s} {value:.3f}" if isinstance(value, float) else f"{key:28s} {value}")


if __name__ == "__main__":
    main()
