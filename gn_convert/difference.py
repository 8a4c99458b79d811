"""How far apart two outputs are: the one relative-error measure every check in gn-convert uses.

A model's output may be a tensor, an array, or a structure of them (dicts, lists, tuples, named
tuples) holding other values too (a string, a count). :func:`relative_error` compares two such
outputs leaf by leaf:

- a tensor or array: the largest absolute difference over the largest magnitude of the
  reference (at least :data:`SCALE_FLOOR`); NaN and infinities must sit where the reference has
  them, with the same sign, or the error is ``inf``;
- any other leaf: equal (error 0) or not (``inf``);
- structures of another shape (other keys, lengths, types, tensor shapes): ``inf``.

So a NaN never hides a difference (``max(0.0, nan)`` is 0.0 in Python; the checks here never
take a maximum over NaN), and a result compares with ``error <= tolerance`` safely.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

SCALE_FLOOR = 1e-6
"""The smallest scale a difference is divided by: outputs near zero are compared absolutely."""


def _as_double(value: Any) -> torch.Tensor:
    tensor = value.detach().cpu() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    return torch.view_as_real(tensor).double() if tensor.is_complex() else tensor.double()


def _array_error(want: Any, got: Any) -> float:
    if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.dtype == got.dtype \
            and want.shape == got.shape and want.device == got.device and torch.equal(want, got):
        return 0.0  # the common case of an exact change, without copies (NaN is never equal: it goes on)
    a, b = _as_double(want), _as_double(got)
    if a.shape != b.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(finite_a, finite_b):
        return float("inf")
    special = ~finite_a  # NaN where NaN, the same infinity where an infinity
    if special.any() and not (torch.equal(a[special].isnan(), b[special].isnan())
                              and torch.equal(a[special & ~a.isnan()], b[special & ~b.isnan()])):
        return float("inf")
    if not finite_a.any():
        return 0.0
    scale = max(float(a[finite_a].abs().max()), SCALE_FLOOR)
    return float((a[finite_a] - b[finite_a]).abs().max()) / scale


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray, np.generic))


def relative_error(want: Any, got: Any) -> float:
    """The largest relative difference between two outputs (see the module docstring).

    Args:
        want: the reference output (its magnitude is the scale).
        got: the output compared with it.

    Returns:
        0.0 for identical outputs; ``inf`` when the structures, shapes, non-tensor leaves or the
        places of NaN and infinities differ; never NaN.
    """
    if _is_array(want) or _is_array(got):
        return _array_error(want, got) if _is_array(want) and _is_array(got) else float("inf")
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping) or list(want) != list(got):
            return float("inf")
        return max((relative_error(want[k], got[k]) for k in want), default=0.0)
    if isinstance(want, (list, tuple)):
        if type(want) is not type(got) or len(want) != len(got):
            return float("inf")
        return max((relative_error(a, b) for a, b in zip(want, got)), default=0.0)
    try:
        return 0.0 if bool(want == got) else float("inf")
    except Exception:  # noqa: BLE001 - a leaf that cannot say whether it equals another
        return 0.0 if want is got else float("inf")
