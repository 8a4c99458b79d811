"""The group plan: which GroupNorm replaces each BatchNorm layer, and why.

A plan is computed without touching the model. Every layer's group count is recorded, with a
reason whenever the requested count could not be used (a *fallback*), so that a user can see
exactly which layers became, say, instance norm.

Policies for a channel count C that the requested groups G do not divide:

- ``divisor`` (default): the largest divisor of C that is <= G.
- ``gcd``: gcd(G, C) groups (what Opacus does).
- ``strict``: refuse, with an error naming the layer.
- ``fidelity``: per layer, the divisor of C up to G whose GroupNorm output is closest to the
  BatchNorm output, measured on images by a ``measure`` the caller injects
  (:func:`gn_convert.fidelity.group_search.layer_errors`); the measured error is recorded.

With ``group_size=K`` (channels per group) instead of ``groups``, the target is C / K groups;
when K does not divide C, ``divisor`` takes the smallest group size >= K that divides C,
``gcd`` takes groups of gcd(K, C) channels, and ``strict`` refuses.

``min_channels_per_group=K`` bounds every policy from below (16 by default for a ``groups``
request): a layer whose chosen groups would hold fewer than K channels (the narrow layers of mobile
networks at G=32 become one-channel groups, instance norm) gets the largest divisor of C that keeps
K channels per group (one group when C < K). That is a chosen default, not a failed request: the
plan records it per layer (``bounded``, with its reason) apart from the policy's *fallbacks*, and
its summary says in words how many layers have each group count. Patterns (``include``,
``exclude``, ``fold``) that match no layer are refused: a typo is the usual cause.
"""

from __future__ import annotations

import collections
import dataclasses
import fnmatch
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gn_convert.errors import GroupPlanError, NoBatchNormError, UnsupportableLayerError
from gn_convert.modes import eval_mode
from gn_convert.surgery.group_count import (
    FIDELITY,
    POLICIES,
    bounded,
    candidates,
    channels_text,
    choose_groups,
    resolve_min_channels,
)
from gn_convert.surgery.registry import BatchNormState, read_batchnorm, unknown_forward

log = logging.getLogger(__name__)

__all__ = ["FIDELITY", "POLICIES", "GroupPlan", "LayerPlan", "Measure", "OnSingle", "batchnorm_layers", "candidates",
           "choose_groups", "plan"]

OnSingle = Literal["error", "skip"]
Measure = Callable[[dict[str, list[int]]], dict[str, dict[int, float]]]
"""``measure(candidates)``: layer name -> candidate group counts in, layer name -> {count: error} out."""


@dataclass(frozen=True)
class LayerPlan:
    """The decision for one BatchNorm layer.

    Attributes:
        name: qualified module name in the model (``layer1.0.bn1``).
        kind: the BatchNorm class name.
        num_channels: channel count C.
        num_groups: GroupNorm groups, or None when the layer is left as it is.
        eps: epsilon copied from the BatchNorm layer.
        affine: whether the layer has an affine transform.
        action: ``convert``, ``skip`` (unsupportable, left as BatchNorm), ``exclude`` (by
            the user's patterns) or ``fold`` (absorbed by the convolution before it, by the
            user's fold patterns; see :mod:`gn_convert.surgery.fold`).
        fallback: True when the request could not be met as asked (G does not divide C, or K
            channels per group does not); the policy chose ``num_groups``.
        reason: why the layer fell back, was bounded or skipped; empty otherwise.
        elements_per_group: values each group normalises per sample, when known.
        measured_error: with the ``fidelity`` policy, the layer's measured output error at its
            chosen group count (1 - R^2 of the best per-channel affine; 0 = exact).
        bounded: True when the channels-per-group bound lowered the group count.
    """

    name: str
    kind: str
    num_channels: int
    num_groups: int | None
    eps: float
    affine: bool
    action: str = "convert"
    fallback: bool = False
    reason: str = ""
    elements_per_group: int | None = None
    measured_error: float | None = None
    bounded: bool = False


@dataclass
class GroupPlan:
    """A per-layer plan for a whole model, plus the request that produced it."""

    groups: int | None
    group_size: int | None
    policy: str
    layers: list[LayerPlan] = field(default_factory=list)
    min_channels_per_group: int | None = None
    """The channels-per-group bound in force (None in plans saved before it was recorded)."""

    @property
    def converted(self) -> list[LayerPlan]:
        """Layers that become GroupNorm."""
        return [layer for layer in self.layers if layer.action == "convert"]

    @property
    def fallbacks(self) -> list[LayerPlan]:
        """Converted layers whose group count differs from the request."""
        return [layer for layer in self.converted if layer.fallback]

    @property
    def untouched(self) -> list[LayerPlan]:
        """Layers left as BatchNorm (skipped or excluded)."""
        return [layer for layer in self.layers if layer.action in ("skip", "exclude")]

    @property
    def folded(self) -> list[LayerPlan]:
        """Layers folded into the convolution before them."""
        return [layer for layer in self.layers if layer.action == "fold"]

    @property
    def bounded(self) -> list[LayerPlan]:
        """Converted layers whose group count the channels-per-group bound lowered."""
        return [layer for layer in self.converted if layer.bounded]

    def summary(self) -> str:
        """One line, in words: the group counts the layers got, why some got fewer than asked, and
        how many fall back, fold and stay BatchNorm."""
        counts = collections.Counter(layer.num_groups for layer in self.converted)
        ordered = sorted(counts.items(), key=lambda item: -(item[0] or 0))
        listed = ", ".join(f"{n} with {g} group{'' if g == 1 else 's'}" if k == 0 else f"{n} with {g}"
                           for k, (g, n) in enumerate(ordered))
        target = f"G={self.groups}" if self.group_size is None else f"group_size={self.group_size}"
        parts = [f"{len(self.converted)} BatchNorm layers -> GroupNorm ({target}, policy {self.policy})"
                 + (f": {listed}" if listed else "")]
        if self.bounded:
            parts.append(f"{len(self.bounded)} keep at least {channels_text(self.min_channels_per_group or 1)} per "
                         f"group (--min-channels-per-group 1 for {target} on every layer)")
        parts.append(f"{len(self.fallbacks)} fallback{'' if len(self.fallbacks) == 1 else 's'} ({self.policy})")
        if self.folded:
            parts.append(f"{len(self.folded)} folded into their convolutions")
        parts.append(f"{len(self.untouched)} left as BatchNorm")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reverses it."""
        return {
            "groups": self.groups,
            "group_size": self.group_size,
            "policy": self.policy,
            "min_channels_per_group": self.min_channels_per_group,
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupPlan:
        """Rebuild a plan written by :meth:`to_dict`."""
        layers = [LayerPlan(**layer) for layer in data["layers"]]
        return cls(data["groups"], data["group_size"], data["policy"], layers, data.get("min_channels_per_group"))


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module, BatchNormState]]:
    """All registered BatchNorm layers of ``model`` as (name, module, state), in order."""
    found = []
    for name, module in model.named_modules():
        state = read_batchnorm(module)
        if state is not None:
            found.append((name, module, state))
    return found


def _refuse_unknown_forward(layers: list[tuple[str, nn.Module, BatchNormState]]) -> None:
    """Refuse BatchNorm subclasses whose own ``forward`` the registry does not understand (all named at once)."""
    unknown = [(name, owner) for name, module, _ in layers if (owner := unknown_forward(module)) is not None]
    if unknown:
        kinds = sorted({owner for _, owner in unknown})
        where = ", ".join(name for name, _ in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise UnsupportableLayerError(
            f"{', '.join(kinds)} override{'s' if len(kinds) == 1 else ''} BatchNorm's forward ({where}): a plain "
            "GroupNorm would drop whatever it adds; register its replacement with "
            "gn_convert.surgery.register_replacement, or exclude those layers")


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    if not patterns:
        return False
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _excluded(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    """Whether the user's patterns leave layer ``name`` as BatchNorm."""
    return bool(include and not _matches(name, include)) or _matches(name, exclude)


def _refuse_unmatched(patterns: dict[str, list[str]], names: list[str]) -> None:
    """Refuse patterns that match no BatchNorm layer (all of them, in one message)."""
    unmatched = [f"{option} pattern {pattern!r}" for option, given in patterns.items() for pattern in given
                 if not any(fnmatch.fnmatchcase(name, pattern) for name in names)]
    if unmatched:
        example = ", ".join(names[:2]) + (f", ..., {names[-1]}" if len(names) > 2 else "")
        raise GroupPlanError(f"{'; '.join(unmatched)} matches no BatchNorm layer (a typo?); this model's BatchNorm "
                             f"layers are {example}")


def _spatial_sizes(model: nn.Module, example_input: torch.Tensor | None) -> dict[str, int]:
    """Per BatchNorm layer, the number of values per channel per sample in ``example_input``."""
    if example_input is None:
        return {}
    sizes: dict[str, int] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            sizes.setdefault(name, math.prod(args[0].shape[2:]))
        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module, _ in batchnorm_layers(model)]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def plan(
    model: nn.Module,
    groups: int | None = 32,
    *,
    group_size: int | None = None,
    policy: str = "divisor",
    min_channels_per_group: int | None = None,
    measure: Measure | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    fold: Iterable[str] | None = None,
    on_single: OnSingle = "error",
    allow_no_bn: bool = False,
    example_input: torch.Tensor | None = None,
) -> GroupPlan:
    """Compute the per-layer group plan for ``model`` without changing it.

    Args:
        model: any module containing BatchNorm layers.
        groups: requested groups per layer (default 32, as in Wu & He).
        group_size: channels per group, instead of ``groups``.
        policy: what to do when the request does not divide a layer's channels:
            ``divisor`` (default), ``gcd`` or ``strict``; or ``fidelity`` (per layer, the
            measured best count up to ``groups``; needs ``measure``).
        min_channels_per_group: the smallest group any layer may get: a layer whose requested groups
            would hold fewer channels gets the largest divisor count that holds at least this many
            (1 group when even that is too narrow). Default: 16 channels
            (:data:`~gn_convert.surgery.group_count.DEFAULT_MIN_CHANNELS`) for a ``groups``
            request, 1 for a ``group_size`` request; pass 1 to force G on every layer.
        measure: with ``policy="fidelity"``, the measurement of each layer's candidates, e.g.
            ``gn_convert.fidelity.group_search.layer_errors(model, images)``.
        include: fnmatch patterns of layer names to convert (default: all).
        exclude: fnmatch patterns of layer names to leave as BatchNorm.
        fold: fnmatch patterns of layer names to fold into the convolution before them instead
            (exact: for layers that will not be trained; applied by :func:`gn_convert.convert`).
        on_single: ``error`` (default) refuses a layer whose groups would normalise a single
            value per sample (the output would be constant); ``skip`` leaves it as BatchNorm.
        allow_no_bn: return an empty plan instead of raising when there is no BatchNorm.
        example_input: an input batch; when given, the number of values per group is measured
            (needed to judge BatchNorm1d on (N, C, L) input; without it (N, C) is assumed).

    Returns:
        The :class:`GroupPlan`.

    Raises:
        NoBatchNormError: the model has no BatchNorm and ``allow_no_bn`` is False.
        GroupPlanError: the request is impossible for some layer, or ``fidelity`` without ``measure``.
        UnsupportableLayerError: a group would hold a single value and ``on_single='error'``.
    """
    include, exclude, fold = list(include or []), list(exclude or []), list(fold or [])
    if on_single not in ("error", "skip"):
        raise GroupPlanError(f"on_single must be 'error' or 'skip', got {on_single!r}")
    min_channels_per_group = resolve_min_channels(min_channels_per_group, group_size)
    if min_channels_per_group < 1:
        raise GroupPlanError(f"min_channels_per_group must be >= 1, got {min_channels_per_group}")
    if policy == FIDELITY and (measure is None or group_size is not None):
        raise GroupPlanError("the fidelity policy measures each layer on images: pass measure= (gn_convert.fidelity."
                             "group_search.layer_errors(model, images)) and groups, not group_size; or use "
                             "gn_convert.recover(..., policy='fidelity'), `--recover --policy fidelity --data DIR`")
    choose_groups(max(group_size or 1, groups or 1), groups, group_size, policy)  # validate the request
    layers = batchnorm_layers(model)
    _refuse_unknown_forward([layer for layer in layers if not _excluded(layer[0], include, exclude)])
    if not layers:
        if allow_no_bn:
            log.warning("model has no BatchNorm layer: nothing to convert")
            return GroupPlan(groups, group_size, policy, min_channels_per_group=min_channels_per_group)
        raise NoBatchNormError("the model has no BatchNorm layer to convert; to accept that as a no-op, pass "
                               "--allow-no-bn (allow_no_bn=True from Python)")
    _refuse_unmatched({"include": include, "exclude": exclude, "fold": fold}, [name for name, _, _ in layers])
    spatial = _spatial_sizes(model, example_input)
    result = GroupPlan(groups, group_size, policy, min_channels_per_group=min_channels_per_group)
    for name, _module, state in layers:
        if _matches(name, fold):
            result.layers.append(LayerPlan(name, type(_module).__name__, state.num_channels, None, state.eps,
                                           state.affine, action="fold", reason="folded into the layer before it"))
            continue
        result.layers.append(_plan_layer(name, _module, state, groups, group_size, policy, min_channels_per_group,
                                         include, exclude, on_single, spatial.get(name)))
    if policy == FIDELITY:
        assert measure is not None and groups is not None
        result.layers = _measured(result.layers, groups, min_channels_per_group, measure)
    for layer in result.fallbacks + [b for b in result.bounded if not b.fallback]:
        log.info("group plan at %s: %s", layer.name, layer.reason)
    for layer in result.untouched:
        level = logging.INFO if layer.action == "exclude" else logging.WARNING
        log.log(level, "%s left as BatchNorm (%s): %s", layer.name, layer.action, layer.reason)
    return result


def _plan_layer(
    name: str,
    module: nn.Module,
    state: BatchNormState,
    groups: int | None,
    group_size: int | None,
    policy: str,
    min_channels_per_group: int,
    include: list[str],
    exclude: list[str],
    on_single: str,
    spatial: int | None,
) -> LayerPlan:
    def layer(**decision: Any) -> LayerPlan:
        return LayerPlan(name=name, kind=type(module).__name__, num_channels=state.num_channels, eps=state.eps,
                         affine=state.affine, **decision)

    if _excluded(name, include, exclude):
        return layer(num_groups=None, action="exclude", reason="excluded by pattern")
    try:
        num_groups, fell_back = choose_groups(state.num_channels, groups, group_size, policy)
    except GroupPlanError as err:
        raise GroupPlanError(f"layer {name}: {err}") from None
    num_groups, bound = bounded(state.num_channels, num_groups, min_channels_per_group)
    reason = "; then ".join(r for r in (fell_back, bound) if r)  # the bound, applied last, wins
    per_channel = spatial if spatial is not None else (1 if state.min_rank == 2 else None)
    elements = None if per_channel is None else per_channel * state.num_channels // num_groups
    if elements == 1:
        why = (f"each of its {num_groups} groups would normalise a single value per sample, "
               "so its output would be constant")
        if on_single == "error":
            raise UnsupportableLayerError(
                f"layer {name} ({state.num_channels} channels, {num_groups} groups): {why}; "
                "use fewer groups, exclude the layer, or on_single='skip' (--skip-unsupportable)"
            )
        return layer(num_groups=None, action="skip", reason=why, elements_per_group=1)
    return layer(num_groups=num_groups, fallback=bool(fell_back), bounded=bool(bound), reason=reason,
                 elements_per_group=elements)


def _measured(layers: list[LayerPlan], groups: int, min_channels_per_group: int, measure: Measure) -> list[LayerPlan]:
    """The fidelity policy: each converted layer takes the candidate count with the smallest measured error."""
    options = {layer.name: candidates(layer.num_channels, groups, min_channels_per_group)
               for layer in layers if layer.action == "convert"}
    errors = measure(options)
    chosen = []
    for layer in layers:
        measured = errors.get(layer.name)
        if layer.action != "convert" or not measured:
            chosen.append(layer)
            continue
        best = min(measured, key=lambda g: (round(measured[g], 6), -g))  # ties: more groups
        default = layer.num_groups
        reason = (f"fidelity: G={best} error {measured[best]:.3f}"
                  + (f" (G={default}: {measured[default]:.3f})" if default in measured and default != best else ""))
        elements = None if layer.elements_per_group is None or default is None else \
            layer.elements_per_group * default // best
        chosen.append(dataclasses.replace(layer, num_groups=best, fallback=best != groups, reason=reason,
                                          measured_error=round(measured[best], 6), elements_per_group=elements))
    return chosen
