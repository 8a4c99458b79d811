"""The group count of one layer: the policies for a request that does not divide its channels.

- ``divisor`` (default): the largest divisor of C that is <= G.
- ``gcd``: gcd(G, C) groups (what Opacus does).
- ``strict``: refuse, with an error naming the layer.
- ``fidelity``: measured per layer by :func:`gn_convert.plan` (here it starts from ``divisor``).

:func:`candidates` lists the counts a layer may take under a bound on its channels per group, and
:func:`bounded` applies that bound to a count a policy chose.
"""

from __future__ import annotations

import math

from gn_convert.errors import GroupPlanError

POLICIES: tuple[str, ...] = ("divisor", "gcd", "strict", "fidelity")
FIDELITY = "fidelity"
DEFAULT_MIN_CHANNELS = 16
"""Channels per group a layer keeps at least, unless the caller says otherwise (``--groups`` requests).

Wu & He's Table 3 finds 16 channels per group as good as G=32 when training from scratch, and a
converted network keeps far more of its function with them: on EfficientNet-Lite0 at G=32 the
development photos gave KL 1.55 against 2.08 zero-shot and 33% against 26% top-1 after ``recover``
(docs/FIDELITY.md). A request by ``group_size`` is itself a bound and is kept as asked.
"""


def resolve_min_channels(min_channels_per_group: int | None, group_size: int | None) -> int:
    """The bound in force: the caller's, else 1 for a ``group_size`` request, else :data:`DEFAULT_MIN_CHANNELS`."""
    if min_channels_per_group is not None:
        return min_channels_per_group
    return 1 if group_size is not None else DEFAULT_MIN_CHANNELS


def choose_groups(
    channels: int, groups: int | None = 32, group_size: int | None = None, policy: str = "divisor"
) -> tuple[int, str]:
    """Pick the group count for ``channels`` under a policy.

    Args:
        channels: channel count C (> 0).
        groups: requested groups G; ignored when ``group_size`` is given.
        group_size: requested channels per group K, instead of ``groups``.
        policy: ``divisor``, ``gcd`` or ``strict`` (see the module docstring).

    Returns:
        (num_groups, reason); reason is empty when the request was met exactly.

    Raises:
        GroupPlanError: the request is impossible (G < 1, K < 1, unknown policy, or
            ``strict`` with a non-dividing request).
    """
    if policy == FIDELITY:
        policy = "divisor"  # the request's own count, before measurement (plan() measures the rest)
    if policy not in POLICIES:
        raise GroupPlanError(f"unknown group policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if group_size is not None:
        if group_size < 1:
            raise GroupPlanError(f"group size must be >= 1, got {group_size}")
        if channels % group_size == 0:
            return channels // group_size, ""
        if policy == "strict":
            raise GroupPlanError(
                f"group size {group_size} does not divide {channels} channels "
                "(use --policy divisor or gcd, or another --group-size)"
            )
        if policy == "gcd":
            size = math.gcd(group_size, channels)
        else:  # the smallest size >= K that divides C; one group of all C when K exceeds C
            size = next((k for k in range(group_size, channels + 1) if channels % k == 0), channels)
        return channels // size, f"group size {group_size} does not divide {channels}; using {size}"
    if groups is None or groups < 1:
        raise GroupPlanError(f"groups must be >= 1, got {groups}")
    if channels % groups == 0:
        return groups, ""
    if policy == "strict":
        raise GroupPlanError(
            f"{groups} groups do not divide {channels} channels "
            "(use --policy divisor or gcd, --group-size, or another --groups)"
        )
    chosen = math.gcd(groups, channels) if policy == "gcd" else max(
        d for d in range(1, min(groups, channels) + 1) if channels % d == 0
    )
    return chosen, f"{groups} does not divide {channels}; using {chosen} ({policy})"


def candidates(channels: int, groups: int, min_channels_per_group: int = 1) -> list[int]:
    """The divisors of ``channels`` up to ``groups`` with at least ``min_channels_per_group``
    channels each (``[1]`` when even one group is narrower than that)."""
    found = [g for g in range(1, min(groups, channels) + 1)
             if channels % g == 0 and channels // g >= min_channels_per_group]
    return found or [1]


def channels_text(count: int) -> str:
    """``1 channel``, ``16 channels``."""
    return f"{count} channel{'' if count == 1 else 's'}"


def bounded(channels: int, num_groups: int, min_channels_per_group: int) -> tuple[int, str]:
    """``num_groups`` lowered, if needed, so that each group keeps ``min_channels_per_group`` channels;
    with the reason when it was (empty when not)."""
    if channels // num_groups >= min_channels_per_group:
        return num_groups, ""
    lowered = max(candidates(channels, num_groups, min_channels_per_group))
    return lowered, (f"{num_groups} groups would hold {channels_text(channels // num_groups)} each; the bound of "
                     f"at least {channels_text(min_channels_per_group)} per group gives {lowered}")
