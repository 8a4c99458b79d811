"""Training memory of a model on CPU, for the studies: what autograd keeps, and the peak of a whole step.

:func:`saved_activation_bytes` counts, exactly and in this process, the tensors a training forward
saves for backward (``torch.autograd.graph.saved_tensors_hooks``; parameters left out, each storage
once): the memory that grows with batch and resolution. :func:`peak_step_bytes` measures what a
whole step (forward and backward) adds to the resident memory of a fresh child process: Linux's
peak counter is reset (``/proc/self/clear_refs`` 5) after a small warm-up step and read
(``VmHWM``) after the measured one, so backward's transient gradients count too. The child runs
the caller's script with ``--memory-probe NAME SIZE``; that script calls :func:`memory_probe`.
:func:`memory_rows` measures both per model and image side, with the batch that fits in
:data:`BUDGETS_GIB`, and :func:`memory_table` prints them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

GIB = 1024 ** 3
BUDGETS_GIB = (16, 24, 80)

log = logging.getLogger(__name__)


def _step_loss(model: nn.Module, size: int, batch: int, classes: int) -> torch.Tensor:
    scores = model(torch.randn(batch, 3, size, size))
    return F.cross_entropy(scores, torch.randint(0, classes, (batch, size, size)))


def saved_activation_bytes(model: nn.Module, size: int, batch: int = 1, classes: int = 4) -> int:
    """Bytes autograd saves for backward in one training forward and per-pixel loss at ``size`` x ``size``.

    Args:
        model: a segmentation model ((N, 3, H, W) -> (N, classes, H, W)); put in train mode.
        size: image side in pixels.
        batch: images in the batch.
        classes: output channels of the model.
    """
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = _step_loss(model, size, batch, classes)
    del loss
    return sum(saved.values())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def memory_probe(model: nn.Module, size: int, classes: int = 4) -> int:
    """In this process (Linux only): the peak resident bytes one training step at batch 1 adds.

    A warm-up step at 64 px allocates the gradients first; then the peak counter is reset, a step at
    ``size`` runs, and the peak is read. Call it in a fresh process (see :func:`peak_step_bytes`).
    """
    model.train()
    _step_loss(model, 64, 1, classes).backward()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    _step_loss(model, size, 1, classes).backward()
    return (_status_kib("VmHWM") - before) * 1024


def peak_step_bytes(script: Path, name: str, size: int) -> int:
    """Run ``script --memory-probe name size`` in a child process (one torch thread); the last number it prints.

    Raises:
        subprocess.CalledProcessError: the child failed.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), "--memory-probe", name, str(size)], capture_output=True,
                          text=True, check=True, env=env)
    return int(done.stdout.split()[-1])


def memory_rows(build: Callable[[str], nn.Module], names: Sequence[str], sides: Sequence[int], script: Path | None,
                classes: int = 4, batch: int = 1) -> list[dict]:
    """Per image, for each model name and image side: saved activations, the peak of a step and what fits.

    Args:
        build: a model name -> the model (also what ``script --memory-probe`` builds).
        names: model names.
        sides: image sides in pixels.
        script: the script to run :func:`peak_step_bytes` with; None measures saved activations only.
        classes: output channels of the models.
        batch: images of the saved-activation measurement (divided out; the peak step is at batch 1).

    Returns:
        One dict per (name, side): ``saved_bytes``, ``peak_step_bytes`` (or None) and ``fits``, the batch
        that fits in each of :data:`BUDGETS_GIB` by the peak (else by the saved activations), model and
        optimiser state left out.
    """
    rows = []
    for name in names:
        model = build(name) if sides else None
        for side in sides:
            assert model is not None
            saved = saved_activation_bytes(model, side, batch, classes) // batch
            peak = peak_step_bytes(script, name, side) if script is not None else None
            per_image = peak if peak is not None else saved
            rows.append({"variant": name, "size": side, "saved_bytes": saved, "peak_step_bytes": peak,
                         "fits": {str(g): int(g * GIB // per_image) for g in BUDGETS_GIB}})
            log.info("memory %s %d px: saved %.2f GiB, peak step %s", name, side, saved / GIB,
                     "-" if peak is None else f"{peak / GIB:.2f} GiB")
    return rows


def memory_table(rows: Sequence[dict]) -> str:
    """Markdown: memory per image and the batch that fits in each budget, per model and image side."""
    lines = ["| norm | image | saved activations | peak of a step | "
             + " | ".join(f"fits in {g} GiB" for g in BUDGETS_GIB) + " |",
             "| --- | ---: | ---: | ---: |" + " ---: |" * len(BUDGETS_GIB)]
    for r in rows:
        peak = "-" if r["peak_step_bytes"] is None else f"{r['peak_step_bytes'] / GIB:.2f} GiB"
        lines.append(f"| {r['variant']} | {r['size']}² | {r['saved_bytes'] / GIB:.2f} GiB | {peak} | "
                     + " | ".join(str(r["fits"][str(g)]) for g in BUDGETS_GIB) + " |")
    return "\n".join(lines)
