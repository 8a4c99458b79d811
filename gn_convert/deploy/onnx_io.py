"""The inputs and outputs of an ONNX model, as a server sees them: names, data types, dims.

Both the Triton repository writer and the local server read a model's interface from its
graph alone, so a repository never names a tensor the model does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from gn_convert.errors import DeployError

#: ONNX element type -> Triton data type (model-config spelling, without the ``TYPE_`` prefix)
TRITON_DTYPES: dict[int, str] = {
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.BFLOAT16: "BF16",
    onnx.TensorProto.STRING: "BYTES",
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of an ONNX graph.

    Attributes:
        name: the tensor's name in the graph.
        elem_type: the ONNX element type (``onnx.TensorProto.FLOAT``, ...).
        shape: one entry per dimension: its size, or None where it is symbolic or unknown.
    """

    name: str
    elem_type: int
    shape: tuple[int | None, ...]

    @property
    def datatype(self) -> str:
        """The Triton protocol data type (``FP32``), as the KServe v2 protocol spells it."""
        return TRITON_DTYPES[self.elem_type]

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy data type of the tensor."""
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(self.elem_type))

    def dims(self, batched: bool) -> list[int]:
        """Triton ``dims``: -1 for a variable size; without the batch dimension when ``batched``."""
        shape = self.shape[1:] if batched else self.shape
        return [-1 if d is None else d for d in shape]


@dataclass(frozen=True)
class ModelIO:
    """The interface of an ONNX model: its graph inputs (initializers excluded) and outputs."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def batch_dynamic(self) -> bool:
        """True when every input and output has a leading dimension of variable size."""
        return all(t.shape and t.shape[0] is None for t in (*self.inputs, *self.outputs))


def _spec(value: onnx.ValueInfoProto, path: Path) -> TensorSpec:
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type":
        raise DeployError(f"{path}: {value.name!r} is a {kind}, not a tensor; Triton serves tensors only")
    tensor = value.type.tensor_type
    if tensor.elem_type not in TRITON_DTYPES:
        type_name = onnx.TensorProto.DataType.Name(tensor.elem_type)
        raise DeployError(f"{path}: {value.name!r} has type {type_name}, which Triton cannot carry")
    if not tensor.HasField("shape"):
        raise DeployError(f"{path}: {value.name!r} has no shape in the graph; export it with a static rank")
    shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim)
    return TensorSpec(value.name, tensor.elem_type, shape)


def read_model_io(path: str | Path) -> ModelIO:
    """Read the inputs and outputs of the ONNX model at ``path`` (external data is not loaded).

    Args:
        path: an ONNX file.

    Returns:
        The model's inputs (graph inputs that are not initializers) and outputs.

    Raises:
        DeployError: the file is missing or not ONNX, or a tensor cannot be served by Triton
            (not a tensor, an unsupported type, unknown rank).
    """
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"{path} is not a file; pass the .onnx file written by `gn-convert export`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and others
        raise DeployError(f"cannot read {path} as ONNX ({type(err).__name__}); pass an .onnx file") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(_spec(v, path) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v, path) for v in model.graph.output)
    if not inputs or not outputs:
        raise DeployError(f"{path} has no graph inputs or no outputs; it cannot be served")
    return ModelIO(inputs, outputs)
