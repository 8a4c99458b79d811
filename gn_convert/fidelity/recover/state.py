"""The resumable state of a recovery: what a killed ``recover`` needs to go on where it stopped.

Rank 0 writes ``CHECKPOINT_DIR/recover.pt`` (atomically) as soon as the student is converted, when a
stage has planned its steps, and after each stage: the plan, the stages done with their results, the
student's weights, the best state kept so far, the seconds spent, the step counts planned and the
run's fingerprint. A distillation stage also keeps its own resumable state in
``CHECKPOINT_DIR/distill`` (:mod:`gn_convert.fidelity.distill.state`), so a run killed in the middle
of it (its first stage too) resumes at the step it reached, with the step count it planned.

The fingerprint (:func:`run_fingerprint`) tells one run from another: digests of the teacher's
weights (and of a given student's weights and plan), the data (a folder's files and sizes, a
Dataset's kind and length) and the options that shape the run. A state saved by another run is
refused, naming what differs. Everything is tensors, numbers, strings, lists and dicts: the file is
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gn_convert.errors import CheckpointError
from gn_convert.fidelity.distill.state import read_state_file, write_state_file
from gn_convert.fidelity.recover.report import StageResult
from gn_convert.surgery.plan import GroupPlan

STATE_FILE = "recover.pt"
FORMAT = "gn-convert-recover/2"
OLD_FORMATS = ("gn-convert-recover/1",)
"""Formats of states saved without a fingerprint (they cannot be told apart from another run's)."""


def save_recovery(folder: str | Path, *, plan: dict[str, Any], results: list[StageResult],
                  student: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None, best_kl: float,
                  elapsed: float, planned: dict[str, int], fingerprint: dict[str, Any]) -> Path:
    """Write the recovery's state to ``folder/recover.pt``; ``fingerprint`` is :func:`run_fingerprint`'s.

    Raises:
        CheckpointError: the folder cannot be created or written.
    """
    state = {"format": FORMAT, "plan": plan, "results": [asdict(r) for r in results],
             "student": {k: v.detach().cpu() for k, v in student.items()},
             "best": None if best is None else {k: v.detach().cpu() for k, v in best.items()},
             "best_kl": best_kl, "elapsed": elapsed, "planned": planned, "fingerprint": fingerprint}
    return write_state_file(Path(folder) / STATE_FILE, state)


def load_recovery(folder: str | Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The saved state in ``folder``, or None when there is none.

    Args:
        folder: the recovery's checkpoint folder.
        fingerprint: the run's :func:`run_fingerprint`; a state saved by another run is refused.

    Raises:
        CheckpointError: the file is corrupt, not a recovery state, or another run's (what differs is named).
    """
    path = Path(folder) / STATE_FILE
    state = read_state_file(path, "recovery")
    if state is None:
        return None
    if isinstance(state, dict) and state.get("format") in OLD_FORMATS:
        raise CheckpointError(f"{path} was saved by an older gn-convert, without the fingerprint that tells its run "
                              "from another: delete it to start over")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gn-convert recovery state; delete it to start over")
    diffs = differences(state["fingerprint"], fingerprint)
    if diffs:
        raise CheckpointError(f"cannot resume from {folder}: the state there is another run's: {'; '.join(diffs)}; "
                              "pass the original model, data and options, or start a new run")
    state["results"] = [StageResult(**r) for r in state["results"]]
    return state


def weights_digest(model: nn.Module) -> str:
    """A digest of every parameter and buffer of ``model``: names, shapes, dtypes and values."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def run_fingerprint(teacher: nn.Module, student: nn.Module | None, plan: GroupPlan | None, data: dict[str, Any],
                    options: dict[str, Any]) -> dict[str, Any]:
    """What tells a run from another (plain values only).

    Args:
        teacher: the BatchNorm model.
        student, plan: a given student and the plan it embodies (None when the run converts the teacher: its plan
            follows from the teacher and the plan options).
        data: the data's fingerprint (:func:`gn_convert.fidelity.recover.data.data_fingerprint`).
        options: the options that shape the run (:func:`trajectory`, and the stages).
    """
    plan_text = None if plan is None else json.dumps(plan.to_dict(), sort_keys=True, default=str)
    return {"teacher": weights_digest(teacher), "student": None if student is None else weights_digest(student),
            "plan": None if plan_text is None else hashlib.blake2b(plan_text.encode(), digest_size=16).hexdigest(),
            "data": data, "options": options}


_WHAT = {"teacher": "the teacher's weights differ", "student": "the given student's weights differ",
         "plan": "the given student's group plan differs"}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (empty when they are the same run)."""
    found = [text for key, text in _WHAT.items() if saved.get(key) != current.get(key)]
    for source in ("data", "eval_data"):
        before, after = saved["data"].get(source), current["data"].get(source)
        if before != after:
            was, now = _data_words(before), _data_words(after)
            found.append(f"the {source} differ ({was} -> {now})" if was != now else
                         f"the {source} differ (as many files and bytes, other names or sizes)")
    options = [f"{k} {saved['options'].get(k)!r} -> {v!r}" for k, v in current["options"].items()
               if saved["options"].get(k) != v]
    if options:
        found.append(f"options differ ({'; '.join(options[:3])})")
    return found


def _data_words(source: dict[str, Any] | None) -> str:
    if source is None:
        return "none"
    if "files" in source:
        return f"{source['files']} files of {source['bytes']} bytes"
    return f"{source.get('kind')} of {source.get('items')} items"


HOW_STEPS_RUN = ("channels_last", "cpu_bf16")
"""Distillation options that change how fast the steps run, not which run it is: a resume may change them."""


def trajectory(opts: dict[str, Any]) -> dict[str, Any]:
    """The options a resumed run must share with the run it resumes (plain values only): the plan, the init,
    distillation and reconstruction, and how the data are split and seen (the budget may change)."""
    plan = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in opts["plan"].items()}
    data = {k: opts["data"][k] for k in ("weights", "input_size", "holdout", "synthetic")}
    synthetic = {f"synthetic_{k}": opts["synthetic"][k] for k in ("size", "start")}
    reconstruct = {f"reconstruct_{k}": v for k, v in opts["reconstruct"].items()}
    distill = {k: v for k, v in opts["distill"].items() if k not in HOW_STEPS_RUN}
    return json.loads(json.dumps({**plan, **distill, "init": opts["init"], **data, **synthetic, **reconstruct},
                                 default=str))


def saved_plan(saved: dict[str, Any] | None) -> GroupPlan | None:
    """The plan stored in a saved recovery state, or None."""
    return GroupPlan.from_dict(saved["plan"]) if saved is not None else None
