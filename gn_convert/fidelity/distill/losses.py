"""Knowledge-distillation losses: logits at a temperature, labels, and GroupNorm outputs.

- :func:`kl_loss`: KL(teacher || student) of the softened distributions, times T^2 so that
  its gradient scale does not depend on the temperature (Hinton et al., 2015); per pixel for a
  segmentation model's ``(N, classes, H, W)`` logits.
- :func:`label_loss`: cross-entropy on the items that carry a label (label >= 0).
- :class:`FeatureTaps`: records, during the forward passes, each student GroupNorm's output
  and the teacher BatchNorm output it replaced; :meth:`FeatureTaps.loss` is the mean over
  layers and samples of the squared error normalised by the teacher's output variance (so
  every layer weighs the same whatever its scale). It gives a dense signal at every layer, which logits
  alone lack when data are few.
- :class:`StatisticsTaps`: the teacher's BatchNorm running statistics as a target for the
  student's own activations: at every converted layer, the batch's per-channel mean and standard
  deviation of the GroupNorm's *input* are pulled towards the BatchNorm's running mean and
  standard deviation (measured by the teacher on its whole training set). It holds for all images,
  not only the ones at hand: a data-free prior against the drift of a student fitted to a few photos.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gn_convert.fidelity.pairs import NormPair
from gn_convert.surgery.observe import register_output_hook


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the batch, and over the positions of dense outputs (``(N, classes, H, W)``: per pixel),
    of KL(teacher || student) over the class axis (1) at ``temperature``, scaled by T^2."""
    t = float(temperature)
    student_log = F.log_softmax(student_logits.float() / t, dim=1)
    teacher_log = F.log_softmax(teacher_logits.float() / t, dim=1)
    positions = student_logits.numel() // max(student_logits.shape[1], 1)
    return F.kl_div(student_log, teacher_log, log_target=True, reduction="sum") / max(positions, 1) * (t * t)


def label_loss(student_logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    """Cross-entropy over the labelled items (label >= 0); None when there are none."""
    if labels is None:
        return None
    keep = labels >= 0
    if not bool(keep.any()):
        return None
    return F.cross_entropy(student_logits[keep].float(), labels[keep])


class FeatureTaps:
    """Forward hooks that keep the latest output of each matched (GroupNorm, BatchNorm) pair.

    Use as a context manager around the training loop; outputs are kept only until the next
    :meth:`loss` call, and not at all while :attr:`enabled` is False (evaluation).

    Args:
        pairs: the student/teacher layer pairs (from :func:`gn_convert.fidelity.calibrate.engine.norm_pairs`).
    """

    def __init__(self, pairs: list[NormPair]) -> None:
        self.pairs = pairs
        self.student: dict[str, torch.Tensor] = {}
        self.teacher: dict[str, torch.Tensor] = {}
        self.enabled = True
        self._handles: list[Any] = []

    def __enter__(self) -> FeatureTaps:
        for pair in self.pairs:
            self._handles.append(register_output_hook(pair.student, self._keep(self.student, pair.name)))
            self._handles.append(register_output_hook(pair.teacher, self._keep(self.teacher, pair.name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.student.clear()
        self.teacher.clear()

    def _keep(self, store: dict[str, torch.Tensor], name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if self.enabled:
                store[name] = output
        return hook

    def loss(self) -> torch.Tensor:
        """Mean over layers and samples of mean((s - t)^2) / (var(t) + 1e-6), per sample.

        Normalising per sample keeps the loss a mean over items, so micro-batches and
        processes add up to the loss of the whole batch. Clears the kept outputs.
        """
        terms = []
        for name, s in self.student.items():
            t = self.teacher.get(name)
            if t is None or t.shape != s.shape:
                continue
            s, t = _samples(s.float(), t.detach().float())
            # sums of squares as norms (one pass fewer than pow then sum); the teacher's variance in two passes:
            # torch's one-pass var ran 5 ms a layer on the CPU
            n = t.shape[1]
            variance = torch.linalg.vector_norm(t - t.mean(1, keepdim=True), dim=1).square() / max(n - 1, 1)
            error = torch.linalg.vector_norm(s - t, dim=1).square() / n / (variance + 1e-6)
            terms.append(error.mean())
        self.student.clear()
        self.teacher.clear()
        if not terms:
            raise RuntimeError("no GroupNorm output was recorded during the forward pass")
        return torch.stack(terms).mean()


def _samples(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both outputs as (samples, values), element for element, in the teacher's memory order: a view for a
    channels-last output too, where ``flatten(1)`` copies it."""
    order = sorted(range(teacher.dim()), key=lambda d: -teacher.stride()[d]) if teacher.dim() > 2 else [0, 1]
    if order[0] != 0:  # the batch is not the outermost dimension: plain order
        order = list(range(teacher.dim()))
    return student.permute(order).flatten(1), teacher.permute(order).flatten(1)


class StatisticsTaps:
    """Forward hooks on the student's GroupNorm layers that compare the batch's per-channel input
    statistics with the teacher BatchNorm's running statistics (see the module docstring).

    Use as a context manager around the training loop; :meth:`loss` averages over layers of
    ``mean_c((m_c - mu_c)^2 + (s_c - sigma_c)^2) / sigma_c^2`` (batch mean and standard deviation over
    samples and positions against the running ones), and clears what it kept. Statistics are
    those of each process's own batch under DDP.

    Args:
        pairs: the student/teacher layer pairs; pairs whose teacher tracks no running statistics are skipped.
    """

    def __init__(self, pairs: list[NormPair]) -> None:
        self.pairs = [p for p in pairs if getattr(p.teacher, "running_var", None) is not None]
        self.terms: list[torch.Tensor] = []
        self.enabled = True
        self._handles: list[Any] = []

    def __enter__(self) -> StatisticsTaps:
        for pair in self.pairs:
            self._handles.append(pair.student.register_forward_hook(self._hook(pair)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.terms.clear()

    def _hook(self, pair: NormPair) -> Any:
        mean, var = pair.teacher.running_mean, pair.teacher.running_var
        assert isinstance(mean, torch.Tensor) and isinstance(var, torch.Tensor)

        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: Any) -> None:
            if not self.enabled:
                return
            x = inputs[0].float().transpose(0, 1).flatten(1)
            scale = var.float() + 1e-3
            self.terms.append((((x.mean(1) - mean.float()) ** 2 + (x.std(1) - var.float().sqrt()) ** 2) / scale).mean())
        return hook

    def loss(self) -> torch.Tensor:
        """Mean over the layers seen since the last call; clears them."""
        if not self.terms:
            raise RuntimeError("no GroupNorm input was recorded during the forward pass")
        found = torch.stack(self.terms).mean()
        self.terms.clear()
        return found
