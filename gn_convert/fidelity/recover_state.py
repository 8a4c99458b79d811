"""The resumable state of a recovery: what a killed ``recover`` needs to go on where it stopped.

After each stage rank 0 writes ``CHECKPOINT_DIR/recover.pt`` (atomically): the plan, the stages
done with their results, the student's weights, the best state kept so far, the seconds spent and
the step counts planned. A distillation stage also keeps its own resumable state in
``CHECKPOINT_DIR/distill`` (:mod:`gn_convert.fidelity.train_state`), so a run killed in the
middle of it resumes at the step it reached. Everything is tensors, numbers, strings, lists and
dicts: the file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gn_convert.atomic import atomic_file
from gn_convert.errors import CheckpointError
from gn_convert.fidelity.recovery import StageResult
from gn_convert.surgery.plan import GroupPlan

STATE_FILE = "recover.pt"
FORMAT = "gn-convert-recover/1"


def save_recovery(folder: str | Path, *, plan: dict[str, Any], results: list[StageResult],
                  student: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None, best_kl: float,
                  elapsed: float, planned: dict[str, int], options: dict[str, Any]) -> Path:
    """Write the recovery's state to ``folder/recover.pt``.

    Raises:
        CheckpointError: the folder cannot be created or written.
    """
    path = Path(folder) / STATE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"cannot create checkpoint folder {path.parent}: {err.strerror or err}") from None
    state = {"format": FORMAT, "plan": plan, "results": [asdict(r) for r in results],
             "student": {k: v.detach().cpu() for k, v in student.items()},
             "best": None if best is None else {k: v.detach().cpu() for k, v in best.items()},
             "best_kl": best_kl, "elapsed": elapsed, "planned": planned, "options": options}
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
    return path


def load_recovery(folder: str | Path, options: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state in ``folder``, or None when there is none.

    Args:
        folder: the recovery's checkpoint folder.
        options: the options that shape the run; a state saved with others is refused.

    Raises:
        CheckpointError: the file is corrupt, not a recovery state, or from a run with other options.
    """
    path = Path(folder) / STATE_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or pickles arbitrary objects
        raise CheckpointError(f"cannot read recovery state {path} ({type(err).__name__}); it is corrupt: "
                              "delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gn-convert recovery state; delete it to start over")
    diffs = [f"{k} {state['options'].get(k)!r} -> {v!r}" for k, v in options.items() if state["options"].get(k) != v]
    if diffs:
        raise CheckpointError(f"cannot resume from {folder}: options differ ({'; '.join(diffs[:3])}); pass the "
                              "original options or start a new run")
    state["results"] = [StageResult(**r) for r in state["results"]]
    return state


def trajectory(opts: dict[str, Any]) -> dict[str, Any]:
    """The options a resumed run must share with the run it resumes (plain values only)."""
    plan = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in opts["plan"].items()}
    return json.loads(json.dumps({**plan, **opts["distill"], "init": opts["init"]}, default=str))


def saved_plan(saved: dict[str, Any] | None) -> GroupPlan | None:
    """The plan stored in a saved recovery state, or None."""
    return GroupPlan.from_dict(saved["plan"]) if saved is not None else None
