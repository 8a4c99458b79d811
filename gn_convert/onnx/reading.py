"""Reading an ONNX file given by a user, with one clear line when it is not one."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from gn_convert.errors import OnnxFileError

LAYERS_KEY = "gn_convert.groupnorm_layers"
"""metadata_props key: JSON list of ``[torch layer name, ONNX output value]`` in graph order."""


def read_model(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model file (and its external data, beside it).

    Args:
        path: the ``.onnx`` file.
        load_external_data: also load weights kept in external-data files.

    Returns:
        The model.

    Raises:
        OnnxFileError: the file is missing, unreadable, not ONNX, or has no graph.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxFileError(f"ONNX file {path} not found; pass a file written by `gn-convert export`")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise OnnxFileError(f"{path} is not a readable ONNX model ({type(exc).__name__}); "
                            "pass a file written by `gn-convert export`") from None
    if not model.graph.node or not model.graph.input or not model.graph.output:
        raise OnnxFileError(f"{path} is not an ONNX model (no graph); pass a file written by `gn-convert export`")
    return model


def groupnorm_layers(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """The GroupNorm layers recorded by the exporter: ``(torch layer name, ONNX output value)``.

    Works for every export target, since lowering keeps each layer's output value name.

    Returns:
        The layers in graph order; empty for a model not written by gn-convert.
    """
    for prop in model.metadata_props:
        if prop.key == LAYERS_KEY:
            try:
                return [(str(a), str(b)) for a, b in json.loads(prop.value)]
            except (ValueError, TypeError):
                return []
    return []
