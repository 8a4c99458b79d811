"""Block-wise reconstruction: fit each block of the student to the teacher's block output.

Post-training-quantisation reconstruction (AdaRound, BRECQ, QDrop) recovers a network from a
few unlabelled images by matching block outputs, not logits: every image gives C*H*W targets
instead of one argmax. Here each block (:mod:`gn_convert.fidelity.blocks`) is fitted in
execution order, on the **student's own input** to the block (so the errors of the blocks
before it, already fitted, are seen and corrected) against the **teacher's output** of the same
block, with Adam on the block's parameters and a normalised squared error per sample.

A block whose fit ends worse on a held-back probe batch than it started is put back as it was.
Memory is bounded: nothing is stored across batches. Each step runs both models only as far as
the block (the forward pass is cut there), so a step costs two partial forward passes and one
block forward/backward; ``reuse`` fits several steps on the same captured pair to amortise
them. Batches come from an iterator that yields fresh (augmented) images, so the fit sees as
many distinct views as the budget allows.

Two options from the post-training-quantisation literature: ``drop`` is QDrop's input mixing
(each element of a block's input comes from the teacher's input with that probability, else
from the student's, so the block learns for inputs between the two), and ``allocate="error"``
shares the budget by each block's error on the teacher's input before fitting, so the blocks
the conversion hurt most get the most steps (``"equal"``: the same share each).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from gn_convert.errors import OptionError
from gn_convert.fidelity import distributed as ddp
from gn_convert.fidelity.blocks import Block, find_blocks
from gn_convert.fidelity.distill.options import trainable_only
from gn_convert.fidelity.pairs import capture_io, capture_span
from gn_convert.modes import eval_mode

log = logging.getLogger(__name__)

TRAINABLE = ("all", "gn-affine")
ALLOCATE = ("equal", "error")
PROBE_STEPS = 2


@dataclass
class BlockFit:
    """What reconstruction did to one block.

    Attributes:
        name: the block's module name.
        steps: optimizer steps taken.
        error_before: normalised squared error against the teacher's block output on a fixed
            probe batch, before fitting (1 = as far as the output's own variance).
        error_after: the same after fitting.
        seconds: wall time spent on the block.
        reverted: the fit made the probe error worse, so the block's parameters were put back.
        completed: whether it ran all the steps it planned (False: its time ran out first).
    """

    name: str
    steps: int
    error_before: float
    error_after: float
    seconds: float
    reverted: bool = False
    completed: bool = True


@dataclass
class ReconstructionReport:
    """What :func:`reconstruct` did: one :class:`BlockFit` per block, in execution order, and whether
    every block was fitted for all its planned steps (``completed``; False when the budget ran out)."""

    blocks: list[BlockFit] = field(default_factory=list)
    seconds: float = 0.0
    completed: bool = True

    def summary(self) -> str:
        """One line: blocks fitted, steps, mean error before and after."""
        if not self.blocks:
            return "reconstructed no block"
        before = sum(b.error_before for b in self.blocks) / len(self.blocks)
        after = sum(b.error_after for b in self.blocks) / len(self.blocks)
        steps = sum(b.steps for b in self.blocks)
        return (f"reconstructed {len(self.blocks)} blocks in {steps} steps ({self.seconds:.0f} s): "
                f"mean block error {before:.3f} -> {after:.3f}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"seconds": self.seconds, "completed": self.completed, "blocks": [asdict(b) for b in self.blocks]}


def block_error(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over samples of mean((output - target)^2) / var(target): every block weighs the same."""
    out, tgt = output.float().flatten(1), target.float().flatten(1)
    return ((out - tgt).pow(2).mean(1) / (tgt.var(1) + 1e-6)).mean()


def _parameters(block: nn.Module, trainable: str) -> list[nn.Parameter]:
    if trainable == "gn-affine":
        modules = [m for m in block.modules() if isinstance(m, nn.GroupNorm)]
        return [p for m in modules for p in m.parameters() if p.requires_grad]
    return [p for p in block.parameters() if p.requires_grad]


def reconstruct(
    student: nn.Module,
    teacher: nn.Module,
    batches: Iterator[torch.Tensor],
    *,
    budget_s: float | None = None,
    steps_per_block: int = 200,
    lr: float = 1e-3,
    trainable: str = "all",
    reuse: int = 2,
    blocks: list[Block] | None = None,
    drop: float = 0.0,
    allocate: str = "equal",
    callback: Callable[[BlockFit], None] | None = None,
    procs: ddp.Processes | None = None,
) -> ReconstructionReport:
    """Fit every block of ``student`` (in place) to the teacher's block outputs, in order.

    Args:
        student: the converted model; its block parameters change.
        teacher: the BatchNorm original (eval mode, never changed).
        batches: an endless iterator of image batches on the models' device (fresh views).
        budget_s: wall-clock seconds for all blocks (shared equally; each block's step count is
            set from its first steps' speed, up to ``steps_per_block``); None: no limit.
        steps_per_block: optimizer steps per block at most.
        lr: Adam's peak learning rate (cosine decay over the block's steps).
        trainable: ``all`` parameters of the block, or its ``gn-affine`` parameters only.
        reuse: optimizer steps on each captured (input, target) pair.
        blocks: the blocks to fit (default :func:`find_blocks`).
        drop: QDrop's probability that an element of a block's input is the teacher's (0: the
            student's input only).
        allocate: ``equal`` shares of the budget per block, or shares in proportion to each
            block's ``error`` on the teacher's input before fitting.
        callback: called after each block with its :class:`BlockFit`.
        procs: the processes of a distributed run (torchrun): each fits on its own batches, the
            gradients are averaged and rank 0's decisions (step counts, reverts) are shared, so
            every process ends with the same student. None: one process.

    Returns:
        The :class:`ReconstructionReport`.

    Raises:
        OptionError: an unknown ``trainable`` or ``allocate``, a non-positive count, or ``drop``
            outside [0, 1].
    """
    if trainable not in TRAINABLE:
        raise OptionError(f"trainable must be one of {', '.join(TRAINABLE)}, got {trainable!r}")
    if allocate not in ALLOCATE:
        raise OptionError(f"allocate must be one of {', '.join(ALLOCATE)}, got {allocate!r}")
    if not 0.0 <= drop <= 1.0:
        raise OptionError(f"drop is a probability, got {drop}")
    if steps_per_block < 1 or reuse < 1:
        raise OptionError("steps_per_block and reuse must be at least 1")
    start = time.perf_counter()
    probe = next(batches)
    blocks = blocks if blocks is not None else find_blocks(teacher, probe)
    report = ReconstructionReport()
    procs = procs or ddp.Processes()
    with eval_mode(student, teacher):
        weights = _weights(blocks, student, teacher, probe, allocate, procs)
        for k, block in enumerate(blocks):
            share = weights[k] / sum(weights[k:])
            left = None if budget_s is None else \
                ddp.from_main((budget_s - (time.perf_counter() - start)) * share, procs)
            if left is not None and left <= 0:
                log.info("reconstruction budget spent: %d of %d blocks fitted", k, len(blocks))
                report.completed = False
                break
            fit = _fit_block(block, student, teacher, batches, probe, left, steps_per_block, lr, trainable, reuse,
                             drop, procs)
            report.blocks.append(fit)
            report.completed = report.completed and fit.completed
            log.info("block %s: error %.4f -> %.4f in %d steps", fit.name, fit.error_before, fit.error_after,
                     fit.steps)
            if callback is not None:
                callback(fit)
    report.seconds = round(time.perf_counter() - start, 2)
    log.info(report.summary())
    return report


def _weights(blocks: list[Block], student: nn.Module, teacher: nn.Module, probe: torch.Tensor, allocate: str,
             procs: ddp.Processes) -> list[float]:
    """Each block's share weight: 1 each (``equal``), or its error on the teacher's input (``error``; rank 0's)."""
    if allocate == "equal":
        return [1.0] * len(blocks)
    errors = []
    with torch.no_grad():
        for block in blocks:
            t_parts = block.parts(teacher)
            inputs, target = capture_span(teacher, t_parts[0], t_parts[-1], probe)
            errors.append(max(float(block_error(block.forward(block.parts(student), inputs), target)), 1e-3))
    log.info("block errors on the teacher's input: %s", ", ".join(f"{e:.3f}" for e in errors))
    return [float(e) for e in ddp.from_main(errors, procs)]


def _mixed(student_in: tuple[Any, ...], teacher_in: tuple[Any, ...], drop: float) -> tuple[Any, ...]:
    """QDrop: each element of every tensor input from the teacher's input with probability ``drop``."""
    return tuple(torch.where(torch.rand_like(s) < drop, t, s) if isinstance(s, torch.Tensor) else s
                 for s, t in zip(student_in, teacher_in))


def _fit_block(block: Block, student: nn.Module, teacher: nn.Module, batches: Iterator[torch.Tensor],
               probe: torch.Tensor, budget_s: float | None, max_steps: int, lr: float, trainable: str,
               reuse: int, drop: float, procs: ddp.Processes) -> BlockFit:
    started = time.perf_counter()
    s_parts, t_parts = block.parts(student), block.parts(teacher)

    def pair(x: torch.Tensor, mix: float = 0.0) -> tuple[tuple[Any, ...], torch.Tensor]:
        inputs, _ = capture_io(student, s_parts[0], x)
        if not mix:
            return inputs, capture_io(teacher, t_parts[-1], x)[1]
        teacher_inputs, target = capture_span(teacher, t_parts[0], t_parts[-1], x)
        return _mixed(inputs, teacher_inputs, mix), target

    params = [p for part in s_parts for p in _parameters(part, trainable)]
    with torch.no_grad():
        probe_in, probe_target = pair(probe)
        before = float(block_error(block.forward(s_parts, probe_in), probe_target))
    if not params:
        return BlockFit(block.name, 0, before, before, round(time.perf_counter() - started, 2))
    original = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=lr)
    steps, total, sized = 0, max_steps, budget_s is None
    with trainable_only(nn.ModuleList(s_parts), params):
        while steps < total:
            with torch.no_grad():
                inputs, target = pair(next(batches), drop)
            for _ in range(min(reuse, total - steps)):
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * steps / total))
                loss = block_error(block.forward(s_parts, inputs), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                ddp.average_gradients(params, procs)
                optimizer.step()
                steps += 1
            if not sized and steps >= PROBE_STEPS:  # the block's speed is known: fit its steps to its budget
                assert budget_s is not None
                per_step = (time.perf_counter() - started) / steps
                total, sized = ddp.from_main(max(steps, min(max_steps, int(budget_s / per_step))), procs), True
            if budget_s is not None and ddp.from_main(time.perf_counter() - started > budget_s, procs):
                break
    completed = steps >= total
    with torch.no_grad():
        after = float(block_error(block.forward(s_parts, probe_in), probe_target))
        reverted = ddp.from_main(not after <= before, procs)  # never leave a block worse than it came (NaN too)
        if reverted:
            for p, value in zip(params, original):
                p.copy_(value)
    return BlockFit(block.name, steps, before, before if reverted else after, round(time.perf_counter() - started, 2),
                    reverted, completed)
