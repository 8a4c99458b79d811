"""Layer pairs and activation capture: what the fidelity stages compare.

Conversion replaces modules in place, so a student's GroupNorm and the teacher's BatchNorm
that it replaced share a qualified name (``layer1.0.bn1``). :func:`norm_pairs` matches them and
refuses a teacher the student was not converted from; :func:`check_trained` refuses a teacher that was
never trained, for every command that distils. :func:`capture` runs a model only as far
as one module and returns that module's input or output; :func:`execution_order` sorts pairs
in the order the forward pass runs them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from gn_convert.data.items import split_batch
from gn_convert.errors import ModelMismatchError, UntrainedTeacherError
from gn_convert.surgery.observe import register_output_hook
from gn_convert.surgery.registry import is_batchnorm

_MISMATCH_HINT = "pass the teacher the student was converted from"
TRAINED_WEIGHTS_HINT = "load the model with its trained weights (weights=FILE, or a pretrained weights name)"
"""What :func:`check_trained` tells a caller who built the teacher itself (``recover``, the main command)."""


@dataclass(frozen=True)
class NormPair:
    """A student GroupNorm and the teacher BatchNorm it replaced."""

    name: str
    student: nn.GroupNorm
    teacher: nn.Module


def norm_pairs(student: nn.Module, teacher: nn.Module) -> list[NormPair]:
    """Match the student's GroupNorm layers to the teacher's BatchNorm layers by name.

    Also checks that every other parameter and buffer of the student exists in the teacher
    with the same shape, and the reverse, so a student converted from a different
    architecture is refused. BatchNorm layers the student folded into their convolutions
    (``fold=``: no norm layer of that name in the student) are no pair; their statistics are
    gone from the student, and a convolution that had no bias has one.

    Returns:
        One :class:`NormPair` per student GroupNorm, in module order.

    Raises:
        ModelMismatchError: a name or shape differs, or the student has no GroupNorm.
    """
    teacher_modules = dict(teacher.named_modules())
    pairs = []
    for name, module in student.named_modules():
        if not isinstance(module, nn.GroupNorm):
            continue
        original = teacher_modules.get(name)
        if original is None or not is_batchnorm(original):
            raise ModelMismatchError(f"student GroupNorm {name} has no BatchNorm of that name in the teacher; "
                                     f"{_MISMATCH_HINT}")
        channels = getattr(original, "num_features", None) or original.weight.numel()
        if channels != module.num_channels:
            raise ModelMismatchError(f"{name}: student has {module.num_channels} channels, teacher {channels}; "
                                     f"{_MISMATCH_HINT}")
        pairs.append(NormPair(name, module, original))
    if not pairs:
        raise ModelMismatchError("the student has no GroupNorm layer; convert it with gn_convert.convert first")
    _check_shapes(student, teacher, teacher_modules, {p.name for p in pairs}, _folded(student, teacher_modules))
    return pairs


def check_trained(teacher: nn.Module, hint: str) -> None:
    """Refuse a teacher that was never trained: one whose every BatchNorm layer that tracks statistics still holds
    the initial ones (mean 0, variance 1), as ``weights="none"`` builds it. Its outputs hardly depend on the input,
    so there is no function to recover and any student "agrees" with it. The one rule of ``recover``,
    ``finetune`` and the main command's calibration and distillation.

    Args:
        teacher: the BatchNorm model.
        hint: what to do instead, in the caller's words (the end of the message).

    Raises:
        UntrainedTeacherError: the teacher was never trained.
    """
    initial = [_initial_statistics(m) for m in teacher.modules() if is_batchnorm(m)]
    tracked = [flag for flag in initial if flag is not None]
    if tracked and all(tracked):
        raise UntrainedTeacherError(f"the teacher was never trained: its {len(tracked)} BatchNorm layers hold their "
                                    "initial statistics (mean 0, variance 1), so there is no function to recover and "
                                    f"agreement with it means nothing; {hint}")


def _initial_statistics(layer: nn.Module) -> bool | None:
    """Whether a BatchNorm layer holds its initial running statistics (None: it tracks none)."""
    mean, var = getattr(layer, "running_mean", None), getattr(layer, "running_var", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return None
    return bool(torch.all(mean.eq(0))) and bool(torch.all(var.eq(1)))


def _folded(student: nn.Module, teacher_modules: dict[str, nn.Module]) -> set[str]:
    """Names of the teacher's BatchNorm layers that the student holds no norm layer for (folded)."""
    ours = dict(student.named_modules())
    return {name for name, module in teacher_modules.items()
            if name in ours and is_batchnorm(module) and not is_batchnorm(ours[name])
            and not isinstance(ours[name], nn.GroupNorm)}


def _check_shapes(student: nn.Module, teacher: nn.Module, teacher_modules: dict[str, nn.Module],
                  norm_names: set[str], folded: set[str]) -> None:
    gone = norm_names | folded
    theirs = {k: v.shape for k, v in teacher.state_dict().items() if k.rpartition(".")[0] not in gone}
    ours = {k: v.shape for k, v in student.state_dict().items() if k.rpartition(".")[0] not in norm_names}
    for key, shape in ours.items():
        owner, _, leaf = key.rpartition(".")
        if folded and leaf == "bias" and getattr(teacher_modules.get(owner), "bias", False) is None:
            continue  # a folded BatchNorm's shift, in a convolution that had no bias
        if key not in theirs:
            raise ModelMismatchError(f"student tensor {key} is missing from the teacher; {_MISMATCH_HINT}")
        if theirs[key] != shape:
            raise ModelMismatchError(f"{key}: student shape {tuple(shape)}, teacher {tuple(theirs[key])}; "
                                     f"{_MISMATCH_HINT}")
    extra = [key for key in theirs if key not in ours]
    if extra:
        raise ModelMismatchError(f"teacher tensor {extra[0]} (and {len(extra) - 1} more) has no counterpart "
                                 f"in the student; {_MISMATCH_HINT}")


def images_of(loader: Iterable[Any], batches: int, device: torch.device) -> Iterator[torch.Tensor]:
    """The image tensors of a loader's first ``batches`` batches, on ``device``.

    A DataLoader with a generator is reseeded first, so every pass sees the same order.
    """
    if isinstance(loader, DataLoader) and loader.generator is not None:
        loader.generator.manual_seed(loader.generator.initial_seed())
    for k, batch in enumerate(loader):
        if k >= batches:
            return
        yield split_batch(batch)[0].to(device)


class _Stop(Exception):
    """Raised by a hook to cut a forward pass short once the wanted activation is seen."""


@contextmanager
def forward_hooks(hooks: Sequence[tuple[nn.Module, Any]]) -> Iterator[None]:
    """Register ``(module, hook)`` forward hooks for the block; remove them afterwards.

    A norm layer that applies an activation (timm's norm-act layers) reports its normalised
    output, before the activation (see :func:`gn_convert.surgery.observe.register_output_hook`).
    """
    handles = [register_output_hook(module, fn) for module, fn in hooks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def normalised(gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """``x`` normalised as ``gn`` normalises it, without the affine, in float32."""
    return F.group_norm(x.float(), gn.num_groups, eps=gn.eps)


def capture_io(model: nn.Module, module: nn.Module, images: torch.Tensor) -> tuple[tuple[Any, ...], Any]:
    """Run ``model`` on ``images`` only as far as ``module``; return its positional inputs and its output.

    Raises:
        ModelMismatchError: ``module`` never ran in the forward pass.
    """
    return capture_span(model, module, module, images)


def capture_span(model: nn.Module, first: nn.Module, last: nn.Module,
                 images: torch.Tensor) -> tuple[tuple[Any, ...], Any]:
    """Run ``model`` on ``images`` only as far as ``last``, once; return ``first``'s positional inputs
    (its first call) and the output of ``last``'s first call after it.

    Raises:
        ModelMismatchError: ``first``, or ``last`` after it, never ran in the forward pass.
    """
    inputs: list[tuple[Any, ...]] = []
    output: list[Any] = []

    def at_first(_module: nn.Module, args: tuple[Any, ...], _output: Any) -> None:
        if not inputs:  # a copy when the pass goes on: a later in-place op may write over them
            inputs.append(args if first is last else
                          tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))

    def at_last(_module: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
        if inputs:
            output.append(out)
            raise _Stop

    with forward_hooks([(first, at_first), (last, at_last)]):
        try:
            model(images)
        except _Stop:
            pass
    if not output:
        missing = first if not inputs else last
        raise ModelMismatchError(f"{type(missing).__name__} never ran in the forward pass; check the student and teacher")
    return inputs[0], output[0]


def capture(model: nn.Module, module: nn.Module, images: torch.Tensor, want_input: bool) -> torch.Tensor:
    """Run ``model`` on ``images`` only as far as ``module``; return its (first) input or its output."""
    inputs, output = capture_io(model, module, images)
    return inputs[0] if want_input else output


def execution_order(pairs: list[NormPair], teacher: nn.Module, images: torch.Tensor) -> list[NormPair]:
    """``pairs`` sorted by when the teacher's forward pass on ``images[:1]`` first runs them."""
    order: list[str] = []

    def hook_for(name: str) -> Any:
        return lambda *_: order.append(name) if name not in order else None

    with forward_hooks([(p.teacher, hook_for(p.name)) for p in pairs]), torch.no_grad():
        teacher(images[:1])
    rank = {name: k for k, name in enumerate(order)}
    return sorted(pairs, key=lambda p: rank.get(p.name, len(rank)))
