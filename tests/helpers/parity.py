"""A corrupted copy of an export, for tests that parity fails and names the layer."""

from __future__ import annotations

from pathlib import Path

import onnx

from gn_convert.onnx import read_model
from gn_convert.onnx.op import groupnorm_nodes


def corrupt_scale(function_file: Path, source: Path, layer: str, dest: Path) -> None:
    """Copy ``source`` with one channel of ``layer``'s GroupNorm scale multiplied by 1.5.

    ``function_file`` is the function-form export (its custom nodes name the scale tensors).
    """
    function_model = read_model(function_file)
    scale_name = next(n.input[1] for n in groupnorm_nodes(function_model) if n.name == layer)
    model = read_model(source)
    tensor = next(t for t in model.graph.initializer if t.name == scale_name)
    values = onnx.numpy_helper.to_array(tensor).copy()
    values[3] *= 1.5
    tensor.CopyFrom(onnx.numpy_helper.from_array(values, scale_name))
    onnx.save(model, str(dest))
