"""Reading state dicts from local files safely, and loading them with one clear line on mismatch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gn_convert.errors import WeightsError, first_line

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "module", "weights", "net", "ema")
MAX_KEYS_SHOWN = 3


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from a local file, safely.

    Accepts a plain state_dict or a checkpoint dict holding one under a usual key, saved with
    ``torch.save`` (read with ``weights_only=True``: no code in the file is ever run) or as
    ``.safetensors``. A ``module.`` prefix (from DataParallel/DDP) is stripped.

    Raises:
        WeightsError: the file is missing, unreadable, or holds no state_dict; the message keeps
            the first line of what torch or safetensors said.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found; pass an existing file, DEFAULT or none")
    kind = file_kind(path)
    if kind not in ("torch", "safetensors"):
        raise WeightsError(f"weights file {path} is {kind}, not a state_dict saved with torch.save or as safetensors "
                           "(corrupt, or not a weights file); pass such a file (.pt, .pth, .safetensors), DEFAULT or none")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, or pickles objects weights_only refuses
        raise WeightsError(
            f"cannot read weights file {path}: it is corrupt, truncated, or holds more than plain tensors "
            f"({type(err).__name__}: {_reason(err)}); only tensors saved with torch.save or "
            "safetensors are loaded: re-save the state_dict alone"
        ) from err
    state = _find_state_dict(data)
    if state is None:
        raise WeightsError(f"weights file {path} holds no state_dict (a dict of tensors, "
                           f"possibly under one of {', '.join(CHECKPOINT_KEYS)})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def file_kind(path: Path) -> str:
    """What a weights file holds, from its first bytes: ``torch`` (torch.save's zip, or a legacy pickle),
    ``safetensors`` (a little-endian header length, then JSON), else a description (``a text file``,
    ``an empty file``, ``a file of another format``)."""
    with open(path, "rb") as stream:
        head = stream.read(16)
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return "torch"
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 1 << 32:
        return "safetensors"
    if not head:
        return "an empty file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "a file of another format"
    return "a text file" if text.isprintable() or text.strip().isprintable() else "a file of another format"


def _reason(err: Exception) -> str:
    """What torch or safetensors said, in one line: for a weights_only refusal, the line that
    names the refused class (torch's first line only says that weights_only loading failed)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    refused = re.search(r"WeightsUnpickler error: ([^\n]*?\.)(?: |$)", text, re.M)
    if refused:
        return f"weights_only loading refused it: {refused.group(1)}"[:300]
    return first_line(RuntimeError(text), 200)


def _find_state_dict(data: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return data
    if isinstance(data, dict):
        for key in CHECKPOINT_KEYS:
            found = _find_state_dict(data.get(key))
            if found is not None:
                return found
    return None


def _listed(label: str, items: list[str]) -> str:
    more = f" (+{len(items) - MAX_KEYS_SHOWN} more)" if len(items) > MAX_KEYS_SHOWN else ""
    return f"{label}: {', '.join(items[:MAX_KEYS_SHOWN])}{more}"


def load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load ``state`` into ``model`` strictly, with one clear line on any mismatch.

    Shapes and keys are checked first, so a mismatch never half-loads the model. The load itself is
    torch's own, with its hooks (a BatchNorm state from before torch 0.4.1 has no
    ``num_batches_tracked``, and torch fills it in); the keys torch then reports missing or
    unexpected make the message.

    Raises:
        WeightsError: shape mismatches, or missing or unexpected keys (the first few named).
    """
    expected = model.state_dict()
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        raise WeightsError(f"{origin} does not fit the model: {_listed('shape mismatch', shapes)}; "
                           "check the architecture name (and num_classes=N)")
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]  # torch fills those
    keys = (("missing", missing), ("unexpected", [k for k in state if k not in expected]))
    problems = [_listed(label, found) for label, found in keys if found]
    if not problems:  # the keys were checked before anything is loaded; torch's own report is the backstop
        result = model.load_state_dict(state, strict=False)
        problems = [_listed(label, found) for label, found in (("missing", result.missing_keys),
                                                               ("unexpected", result.unexpected_keys)) if found]
    if problems:
        raise WeightsError(f"{origin} does not fit the model: {'; '.join(problems)}; "
                           "check the architecture name (and num_classes=N)")
