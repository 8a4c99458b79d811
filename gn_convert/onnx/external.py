"""Models whose weights do not fit in one protobuf (2 GB): detached weights and external data.

A serialised ONNX protobuf cannot exceed 2 GB. Passes that serialise the model (onnx's C++
inliner, in-memory shape inference) therefore run on a copy whose large initializers have
their bytes taken out (:func:`detach_weights`, undone by :func:`restore_weights`), and such
a model is saved with its weights in one external-data file beside it
(``model.onnx.data``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import onnx

PROTOBUF_LIMIT = 2**31 - 1
HEADROOM = 64 * 2**20
"""Graph structure, names and metadata are kept below the limit by this margin."""
DETACH_MIN_BYTES = 1024
"""Initializers at least this large leave the protobuf; smaller ones (shapes, axes) stay."""


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of raw initializer data held inside the model's main graph."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether the model is too large to be one protobuf file."""
    return initializer_bytes(model) > PROTOBUF_LIMIT - HEADROOM


def detach_weights(model: onnx.ModelProto, min_bytes: int = DETACH_MIN_BYTES) -> dict[str, bytes]:
    """Take the bytes of every large initializer out of the model (in place).

    Names, types and shapes stay, so shape inference and graph passes still see them.

    Args:
        model: the model to shrink.
        min_bytes: initializers with fewer raw bytes keep their data.

    Returns:
        Initializer name -> bytes, for :func:`restore_weights`.
    """
    detached: dict[str, bytes] = {}
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) >= min_bytes:
            detached[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    return detached


def restore_weights(model: onnx.ModelProto, detached: dict[str, bytes]) -> None:
    """Put detached bytes back into the initializers of the same names (in place).

    Raises:
        ValueError: when an initializer with detached bytes is missing from ``model``.
    """
    restored = set()
    for tensor in model.graph.initializer:
        if tensor.name in detached:
            tensor.raw_data = detached[tensor.name]
            restored.add(tensor.name)
    missing = set(detached) - restored
    if missing:
        raise ValueError(f"initializers lost by a pass: {', '.join(sorted(missing)[:3])}")


@contextlib.contextmanager
def weights_detached(model: onnx.ModelProto, when: bool = True) -> Iterator[dict[str, bytes]]:
    """Detach the model's large weights for the block and restore them after it.

    Args:
        model: the model (changed in place during the block).
        when: detach only when True (for example, only for models near the limit).

    Yields:
        The detached bytes; pass them to :func:`restore_weights` for models made in the block.
    """
    detached = detach_weights(model) if when else {}
    try:
        yield detached
    finally:
        restore_weights(model, detached)


def save(model: onnx.ModelProto, path: Path, external: bool) -> list[Path]:
    """Save the model, its weights in ``<name>.data`` beside it when ``external``.

    With ``external``, onnx moves the bytes out of ``model`` itself: its large initializers
    become references to the written data file.

    Args:
        model: the model with its weights.
        path: the file to write.
        external: write initializers of 1 KiB or more to one external-data file.

    Returns:
        The files written, the model file first.
    """
    if not external:
        onnx.save_model(model, str(path))
        return [path]
    location = f"{path.name}.data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=DETACH_MIN_BYTES, convert_attribute=False)
    return [path, path.with_name(location)]
