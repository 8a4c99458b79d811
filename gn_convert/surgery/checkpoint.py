"""Saving a converted model, and rebuilding it from the saved folder alone.

A checkpoint is a folder with two files:

- ``model.safetensors`` (or ``model.pt``, a plain state_dict): the weights;
- ``config.json``: the architecture, its constructor arguments, the group plan, the source
  weights and the package version.

:func:`load_converted` rebuilds the GroupNorm model from these alone, without the original
BatchNorm weights: it builds the architecture, applies the saved plan and loads the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gn_convert import strict_json
from gn_convert._version import __version__
from gn_convert.atomic import atomic_file
from gn_convert.errors import CheckpointError, GnConvertError, OutputError
from gn_convert.load.names import build_model
from gn_convert.load.state_dict import load_weights_into, read_state_dict
from gn_convert.ownership import manifest, record
from gn_convert.surgery.plan import GroupPlan
from gn_convert.surgery.replace import convert

FORMAT = "gn-convert/1"
CONFIG_FILE = "config.json"
WEIGHT_FILES = {"safetensors": "model.safetensors", "pt": "model.pt"}


def save(
    model: nn.Module,
    folder: str | Path,
    *,
    plan: GroupPlan,
    architecture: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    source_weights: str | None = None,
    extra: dict[str, Any] | None = None,
    weights_format: str = "safetensors",
) -> Path:
    """Write a converted model's weights and config into ``folder``.

    Args:
        model: the converted model.
        folder: destination folder (created if missing).
        plan: the group plan the model was converted with.
        architecture: torchvision model name, so :func:`load_converted` can rebuild it; None
            for custom modules (then pass ``model=`` to :func:`load_converted`).
        model_kwargs: constructor arguments of the architecture (e.g. ``num_classes``).
        source_weights: where the BatchNorm weights came from.
        extra: more JSON-ready fields to record (input size, categories, ...).
        weights_format: ``safetensors`` (default) or ``pt`` (a plain state_dict).

    Returns:
        The folder's path.

    The two files are recorded in the folder's manifest (:mod:`gn_convert.ownership`); a file of the
    same name that gn-convert did not write is never overwritten.

    Raises:
        OutputError: the folder or a file cannot be written, or a file of the same name that
            gn-convert did not write is in the way.
    """
    if weights_format not in WEIGHT_FILES:
        raise GnConvertError(f"unknown weights format {weights_format!r}; use safetensors or pt")
    folder = Path(folder)
    weights_file = WEIGHT_FILES[weights_format]
    ours = manifest(folder) or set()
    clash = [name for name in (weights_file, CONFIG_FILE) if (folder / name).exists() and name not in ours]
    if clash:
        raise OutputError(f"{folder / clash[0]} exists and gn-convert did not write it; save into a new or empty "
                          "folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {folder}: {err.strerror or err}; choose a writable location") from None
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        with atomic_file(folder / weights_file) as tmp:
            save_file(state, str(tmp))
    else:
        with atomic_file(folder / weights_file) as tmp:
            torch.save(state, tmp)
    config = {
        "format": FORMAT,
        "gn_convert_version": __version__,
        "torch_version": torch.__version__,
        "architecture": architecture,
        "model_kwargs": model_kwargs or {},
        "source_weights": source_weights,
        "weights_file": weights_file,
        "plan": plan.to_dict(),
        **(extra or {}),
    }
    with atomic_file(folder / CONFIG_FILE) as tmp:
        tmp.write_text(strict_json.dumps(config, indent=2))
    try:
        record(folder, [weights_file, CONFIG_FILE])  # --force and clean-up remove these two, nothing else
    except OSError as err:
        raise OutputError(f"cannot write {folder}: {err.strerror or err}; choose a writable location") from None
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    """Read and check a checkpoint's ``config.json``.

    Raises:
        CheckpointError: the folder is missing, or not a gn-convert checkpoint.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a gn-convert checkpoint (no {CONFIG_FILE}); "
                              "pass the folder written by `gn-convert MODEL --out DIR`")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path}: {err}; the checkpoint is corrupt, convert again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path} was not written by gn-convert (format {FORMAT} expected)")
    return config


def load_converted(folder: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a converted GroupNorm model from a checkpoint folder alone.

    Args:
        folder: a folder written by :func:`save`.
        model: the unconverted architecture, for checkpoints of custom modules (its weights are
            replaced); None builds the recorded torchvision architecture.

    Returns:
        The converted model, in eval mode, with the saved weights (a checkpoint saved DP-ready,
        ``"dp_ready": true`` in config.json, comes back DP-ready and in training mode).

    Raises:
        CheckpointError: the folder is not a readable gn-convert checkpoint, or does not fit.
    """
    config = read_config(folder)
    built = model is None
    if model is None:
        if not config.get("architecture"):
            raise CheckpointError(f"{folder} holds a custom model; pass its module as model=")
        model = build_model(config["architecture"], init_weights=False, **config.get("model_kwargs", {}))
    try:
        plan = GroupPlan.from_dict(config["plan"])
        size = config.get("input_size")
        example = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0)) if size else None
        converted = convert(model, plan=plan, init="identity", inplace=built, example_input=example,
                            prove=False)  # the weights are loaded next
        state = read_state_dict(Path(folder) / config["weights_file"])
        load_weights_into(converted, state, f"checkpoint {folder}")
        if config.get("dp_ready"):
            from gn_convert.surgery.dp import make_dp_ready

            return make_dp_ready(converted, example)  # trainable under Opacus, in training mode, as it was saved
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{folder}/{CONFIG_FILE} is incomplete ({err}); convert again") from None
    except GnConvertError as err:
        raise CheckpointError(str(err)) from None
    return converted.eval()
