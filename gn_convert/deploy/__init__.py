"""Deployment: a Triton model repository for an exported model, and a local Triton server.

- :func:`write_triton_repo`: ``REPO/NAME/config.pbtxt`` + ``REPO/NAME/1/model.onnx``, checked
  with Triton's own model-config protobuf.
- :class:`TritonModelServer`, :func:`serve_until_signal`: a real ``tritonserver`` (from
  ``nvidia-pytriton``) serving the model through onnxruntime, over HTTP and gRPC.

Both need the optional ``serve`` extra (``pip install 'gn-convert[serve]'``); importing this
package does not.
"""

from __future__ import annotations

from gn_convert.deploy.labels import labels_beside, read_labels
from gn_convert.deploy.onnx_io import ModelIO, TensorSpec, read_model_io
from gn_convert.deploy.ports import find_free_port
from gn_convert.deploy.server import TritonModelServer, serve_until_signal
from gn_convert.deploy.triton_repo import check_model_dir, read_config, write_triton_repo
from gn_convert.errors import DeployError, ServeExtraMissingError, ServerError

__all__ = [
    "DeployError",
    "ModelIO",
    "ServeExtraMissingError",
    "ServerError",
    "TensorSpec",
    "TritonModelServer",
    "check_model_dir",
    "find_free_port",
    "labels_beside",
    "read_config",
    "read_labels",
    "read_model_io",
    "serve_until_signal",
    "write_triton_repo",
]
