"""The resumable state of a distillation run, saved atomically and read back safely.

One file, ``state.pt`` in the run's checkpoint folder, holds everything a killed run needs
to continue exactly where it stopped: the step, the student's weights, the optimizer state,
the gradient scaler state (CUDA AMP), the metrics history and the options that shape the
run. The learning-rate schedule and the data order are pure functions of the step and the
seed, so the step restores them. Everything is a tensor, number, string, list or dict: the
file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from gn_convert.atomic import atomic_file
from gn_convert.errors import CheckpointError, OutputError
from gn_convert.ownership import owned, record

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
STATE_FORMAT = "gn-convert-distill/1"

#: options that change the trajectory of a run: a resumed run must use the same values
TRAJECTORY_KEYS: tuple[str, ...] = (
    "steps", "batch_size", "lr", "gn_lr_scale", "weight_decay", "warmup_steps", "temperature",
    "ce_weight", "feature_weight", "stats_weight", "mixup", "trainable", "seed", "holdout", "augment", "flip",
)


def state_path(folder: str | Path) -> Path:
    """The state file inside a run's checkpoint folder."""
    return Path(folder) / STATE_FILE


def write_state_file(path: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (plain tensors, numbers, lists, dicts) to ``path`` atomically, and record the file
    in its folder's manifest (clean-up removes it, and nothing the user keeps there).

    Raises:
        CheckpointError: the folder cannot be created or written, or ``path`` is a file gn-convert did not
            write (a user's own ``state.pt`` is never replaced).
    """
    if path.exists() and path.name not in owned(path.parent):
        raise CheckpointError(f"{path} exists and gn-convert did not write it: it is not replaced; choose another "
                              "state folder (--state-dir) or move the file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            torch.save(state, tmp)
        record(path.parent, [path.name])
    except (OSError, OutputError) as err:
        reason = err.strerror if isinstance(err, OSError) else str(err)
        raise CheckpointError(f"cannot write checkpoint folder {path.parent}: {reason or err}") from None
    return path


def read_state_file(path: Path, kind: str) -> Any:
    """What :func:`write_state_file` wrote at ``path``, or None when there is no file; ``kind`` names it in errors.

    Raises:
        CheckpointError: the file is truncated, corrupt, or pickles anything but plain data.
    """
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or pickles arbitrary objects
        raise CheckpointError(f"cannot read {kind} state {path} ({type(err).__name__}); it is corrupt: "
                              "delete it to start over") from None


def save_state(folder: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``folder/state.pt`` (see :func:`write_state_file`).

    Raises:
        CheckpointError: the folder cannot be created or written.
    """
    path = write_state_file(state_path(folder), {"format": STATE_FORMAT, **state})
    log.debug("saved training state at step %s to %s", state.get("step"), path)
    return path


def load_state(folder: str | Path) -> dict[str, Any] | None:
    """Read a run's state from ``folder/state.pt``; None when there is none yet.

    Raises:
        CheckpointError: the file exists but is corrupt, truncated or not a distillation state.
    """
    path = state_path(folder)
    state = read_state_file(path, "training")
    if state is None:
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a gn-convert distillation state; delete it to start over")
    for key in ("step", "student", "optimizer", "options", "history"):
        if key not in state:
            raise CheckpointError(f"training state {path} lacks {key!r}; it is corrupt: delete it to start over")
    return state


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: str | Path) -> None:
    """Refuse to resume with options that would change the run's trajectory.

    Args:
        saved: the options stored in the state file.
        current: the options of the run that resumes.
        path: the checkpoint folder, for the message.

    Raises:
        CheckpointError: some trajectory option differs (the first few are named).
    """
    diffs = [f"{k} {saved.get(k)!r} -> {current.get(k)!r}" for k in TRAJECTORY_KEYS
             if k in current and k in saved and saved[k] != current[k]]  # a key older states lack is not a change
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: options differ ({'; '.join(diffs[:3])}); "
                              "pass the original options or start a new run")
