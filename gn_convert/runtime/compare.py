"""Two onnxruntime sessions of one model, compared on random inputs of every kind the model takes.

Used wherever gn-convert changes how a model runs and must show the answer did not change: the
blocked-layout rewrite against onnxruntime's own graph, the session a Triton server will run
against the plain function body.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from gn_convert.difference import relative_error
from gn_convert.errors import GnConvertError, first_line

SEEDS = (0, 1)
BATCHES = (1, 3)
"""Every seed at every batch size (where the batch axis is dynamic)."""

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
                "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
                "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def random_feeds(inputs: Any, seed: int, batch: int, error: type[GnConvertError]) -> dict[str, NDArray[Any]]:
    """Random feeds for every input of a session: normal floats, small non-negative integers
    (indices, counts), random booleans; symbolic axes get ``batch`` (the first) or 64.

    Raises:
        error: an input of a type that cannot be drawn (a string, a sequence).
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in inputs:
        dtype = _NUMPY_TYPES.get(value.type)
        if dtype is None:
            raise error(f"cannot draw a random value for input {value.name!r} ({value.type})")
        shape = [d if isinstance(d, int) and d > 0 else (batch if k == 0 else 64) for k, d in enumerate(value.shape)]
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype is np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        else:
            feeds[value.name] = rng.integers(0, 4, shape).astype(dtype)
    return feeds


def compare_sessions(reference: Any, candidate: Any, what: str, error: type[GnConvertError], tolerance: float,
                     hint: str, batches: tuple[int, ...] = BATCHES) -> float:
    """Run both sessions on random inputs (every input, each batch size where the batch axis is
    dynamic, two seeds) and compare every output.

    Args:
        reference, candidate: onnxruntime sessions (or objects with ``get_inputs`` and ``run``).
        what: what the candidate is, for the message ("the blocked-layout rewrite").
        error: the exception type to raise.
        tolerance: the largest error allowed, relative to the output's largest value.
        hint: what the user should do, appended to the message.
        batches: the batch sizes to try.

    Returns:
        The largest relative error found.

    Raises:
        error: an output differs by more than ``tolerance``, or a session fails on the input
            (onnxruntime's first line quoted).
    """
    inputs = reference.get_inputs()
    dynamic = any(not isinstance(v.shape[0], int) or v.shape[0] <= 0 for v in inputs if v.shape)
    worst = 0.0
    for batch in batches if dynamic else batches[:1]:
        for seed in SEEDS:
            feeds = random_feeds(inputs, seed, batch, error)
            try:
                wanted, found = reference.run(None, feeds), candidate.run(None, feeds)
            except Exception as err:  # onnxruntime's own types, raised at run time
                raise error(f"cannot check {what}: onnxruntime failed on a random input (batch {batch}): "
                            f"{first_line(err)}") from err
            if len(wanted) != len(found):
                raise error(f"{what} changed the model's outputs: {len(found)} where it had {len(wanted)}; {hint}")
            pairs = list(zip(wanted, found))
            for want, got in pairs:
                diff = relative_error(want, got)
                if not diff <= tolerance:
                    raise error(f"{what} changed the model's output (relative error {diff:.1e} on a random input, "
                                f"batch {batch}, seed {seed}); {hint}")
                worst = max(worst, diff)
    return worst
