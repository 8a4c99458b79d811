"""Triton helpers for the deploy and serve tests: config parsing and inference clients."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

STARTUP_TIMEOUT_S = 60.0


def parsed(model_dir: Path) -> Any:
    """config.pbtxt parsed independently of the writer, with Triton's own ModelConfig protobuf."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb.ModelConfig())


def client_module(protocol: str) -> Any:
    """tritonclient's http or grpc module."""
    if protocol == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    return module


@contextlib.contextmanager
def client(server: Any, protocol: str) -> Iterator[Any]:
    """A client of ``server`` (a TritonModelServer), closed on exit."""
    c = client_module(protocol).InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)
    try:
        yield c
    finally:
        c.close()  # an open HTTP connection would hold the server's shutdown for its exit timeout


def infer(c: Any, protocol: str, x: np.ndarray, name: str = "input", datatype: str = "FP32",
          model: str = "resnet18") -> np.ndarray:
    """One inference request; the output tensor named ``output``."""
    tensor = client_module(protocol).InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return c.infer(model, [tensor]).as_numpy("output")
