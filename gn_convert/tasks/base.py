"""What gn-convert needs to know about one kind of model (a *task*), and the image classifier's answers.

The pipeline, parity, recovery and deployment never branch on a model's task: they ask its
:class:`Task`. A task says

- which torchvision models it has (``names``) and how to build one (``build``: the backbone weights
  of dense models are not downloaded unless asked for);
- the input a model takes (``input_size``, ``example``): ``(N, 3, H, W)`` images, or
  ``(N, 3, T, H, W)`` clips;
- what is exported and compared (``exportable``: a module whose output is a tensor or a tuple of
  tensors, with ``output_names``), and how (``export``, ``check_parity``);
- whether the weights' categories label an output (``labels``).

:class:`Classification` is the default every other task refines.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm


class DictOutputs(nn.Module):
    """``model``'s dict output as a tuple, in :attr:`keys` order (what an ONNX file can return)."""

    def __init__(self, model: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        return tuple(out[k] for k in self.keys)


class Task:
    """A kind of model; by default an image classifier: ``(N, 3, H, W)`` in, logits ``(N, classes)`` out
    (torchvision's ``models``, and timm's)."""

    name = "classification"
    module: Any = tvm
    frames = 0
    """Frames of a clip (video tasks); 0 for images."""
    batched = True
    """Whether the exported file takes a batch (its first axis); a server batches requests only then."""
    body = "layer-norm"
    """The GroupNorm function body of the export (:data:`gn_convert.onnx.op.BODIES`): dense tasks take
    ``two-level``, precise on the long rows of high-resolution activations."""

    def names(self) -> list[str]:
        """The torchvision model names of this task, sorted."""
        return sorted(tvm.list_models(module=self.module))

    def build(self, name: str, **kwargs: Any) -> nn.Module:
        """torchvision's builder of ``name`` with ``kwargs`` (its notices silenced)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="torchvision")  # GoogLeNet/Inception
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            model: nn.Module = tvm.get_model(name, **kwargs)
        return model

    def input_size(self, weights: Any) -> tuple[int, ...]:
        """The per-sample spatial size the weights were evaluated at: ``(H, W)``, ``(T, H, W)`` for clips."""
        crop = weights.transforms().crop_size
        side = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
        return (*((self.frames,) if self.frames else ()), side, side)

    def example(self, size: tuple[int, ...], batch: int = 2, seed: int = 0) -> torch.Tensor:
        """A seeded input batch ``(batch, 3, *size)``."""
        return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))

    def exportable(self, model: nn.Module) -> nn.Module:
        """The module that is exported and compared (its output a tensor or a tuple of tensors)."""
        return model

    def output_names(self, model: nn.Module) -> tuple[str, ...]:
        """The names of the exported outputs, in order."""
        return ("output",)

    def labels(self, categories: list[str] | None) -> list[str] | None:
        """The class names that label the output (``labels.txt`` of a Triton model), or None."""
        return categories

    def export(self, model: nn.Module, path: Path, *, input_size: tuple[int, ...], **options: Any) -> Any:
        """Export ``model`` (converted) to ``path``; the :class:`gn_convert.onnx.ExportReport`."""
        from gn_convert.onnx.export import export_onnx

        options.setdefault("body", self.body)
        return export_onnx(self.exportable(model), path, input_shape=(1, 3, *input_size),
                           output_names=self.output_names(model), **options)

    # -- recovery (gn_convert.recover): what is distilled and how it is scored --------------------------------

    def output_loss(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        """The distillation loss between the head's outputs: KL on the class axis at ``temperature`` (per
        position for dense outputs; :func:`gn_convert.fidelity.distill.losses.kl_loss`)."""
        from gn_convert.fidelity.distill.losses import kl_loss

        return kl_loss(student, teacher, temperature)

    def head(self, model: nn.Module) -> nn.Module:
        """The module recovery distils and scores: the recovery's batches in, the compared outputs out
        (``(N, classes)`` logits for a classifier)."""
        return model

    def recovery_views(self, found: Any) -> Any:
        """The recovery's data (:class:`~gn_convert.fidelity.recover.data.RecoveryData` of image views) as
        the head takes them (images, for every task but video)."""
        return found

    def model_scores(self, teacher: nn.Module, found: Any) -> Callable[[nn.Module], dict[str, float]] | None:
        """What a recovery scores on whole models besides the head's outputs: a function of the student
        (:class:`~gn_convert.fidelity.recover.data.RecoveryData` ``found`` gives the held-out views), or None
        where the head's outputs say it all (every task but detection)."""
        return None

    def measure(self, student: torch.Tensor, teacher: torch.Tensor, groups: Any = None,
                resamples: int = 500) -> dict[str, Any]:
        """Held-out scores of the head's outputs (:func:`gn_convert.fidelity.metrics.agreement_metrics`:
        top-1 agreement, confident share, top-5, KL; per position for dense outputs, with mean IoU)."""
        from gn_convert.fidelity.metrics import agreement_metrics

        return agreement_metrics(student, teacher, groups, resamples=resamples)

    def check_parity(self, model: nn.Module, path: Path, *, input_size: tuple[int, ...] | None = None,
                     **options: Any) -> Any:
        """Compare the exported file with ``model`` (:func:`gn_convert.parity.check_parity`; the file's
        recorded input shape is checked, so ``input_size`` is not needed)."""
        from gn_convert.parity.check import check_parity

        return check_parity(self.exportable(model), path, **options)
