"""Lowering a traced model to a target, and writing an artifact: checked in a staging folder,
then moved into place (nothing is left behind on any failure)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import onnx

from gn_convert.atomic import Stage, staged_files
from gn_convert.errors import ExportError
from gn_convert.onnx.external import needs_external_data, restore_weights, save, weights_detached
from gn_convert.onnx.lowering.common import model_opset
from gn_convert.onnx.targets import get_target
from gn_convert.onnx.verify import NodeCounts, check_counts, check_onnx


def lower(model: onnx.ModelProto, target: str) -> onnx.ModelProto:
    """Turn a traced model (custom nodes, no function yet) into the given target's form.

    Args:
        model: a model with ``ai.gn_convert::GroupNorm`` nodes (left unchanged, except that
            ``function`` attaches the function to ``model`` itself and returns it).
        target: a name of :data:`gn_convert.onnx.targets.TARGETS`.

    Returns:
        The lowered model.

    Raises:
        ExportError: the target is unknown, or its pass declined (the reason is in the message).
    """
    spec = get_target(target, model_opset(model))
    if spec.custom_op:
        lowered: onnx.ModelProto = spec.lower(model)
        return lowered
    with weights_detached(model, when=needs_external_data(model)) as detached:
        try:
            lowered = spec.lower(model)  # noqa: F811
        except ValueError as err:
            raise ExportError(f"cannot lower to {target}: {err}") from err
    restore_weights(lowered, detached)
    return lowered


def set_metadata(model: onnx.ModelProto, props: Mapping[str, str]) -> None:
    """Add or replace ``metadata_props`` entries."""
    current = {p.key: p.value for p in model.metadata_props}
    current.update({str(k): str(v) for k, v in props.items()})
    onnx.helper.set_model_props(model, current)


def write_model(model: onnx.ModelProto, path: str | Path, target: str, *, calls: int,
                allow_batchnorm: bool, external_data: bool | None = None,
                stage: Stage | None = None) -> tuple[list[Path], NodeCounts]:
    """Write a lowered model, check it and move it into place.

    Args:
        model: the lowered model (its metadata already set).
        path: the destination file.
        target: the form ``model`` is in, for the node-count check.
        calls: GroupNorm calls the model must hold.
        allow_batchnorm: whether ``BatchNormalization`` nodes of the original model may remain.
        external_data: weights in ``<file>.data``; None decides by size (over 2 GB).
        stage: an open staging area for ``path`` (one is opened when None).

    Returns:
        The final files (model file first) and the node counts.

    Raises:
        ExportError: a check failed (nothing is left behind).
        OutputError: the destination cannot be written.
    """
    if stage is None:
        with staged_files(path) as own:
            return write_model(model, path, target, calls=calls, allow_batchnorm=allow_batchnorm,
                               external_data=external_data, stage=own)
    counts = check_counts(model, target, calls, allow_batchnorm)
    external = needs_external_data(model) if external_data is None else external_data
    try:
        save(model, stage.path, external)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot save {path}: {exc}") from exc
    check_onnx(stage.path, model)
    return stage.commit(), counts
