"""Serve one model folder of a Triton repository (what ``gn-convert deploy`` wrote) with the local
Triton server, as Triton's onnxruntime backend would run it.

The server (:class:`gn_convert.deploy.server.TritonModelServer`) answers over the Triton protocols,
and its session is the backend's: the folder's model file, the kernel library its config loads
(``model_operations``, taken from the folder, where ``deploy`` put it), its batching, and
onnxruntime's own optimisations only, never gn-convert's blocked-layout rewrite. So the answers are
the ones a Triton server with this onnxruntime gives for the repository, on this CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gn_convert.deploy.server import TritonModelServer
from gn_convert.deploy.triton_repo import VERSION, check_model_dir
from gn_convert.errors import DeployError


def server_for_model_dir(model_dir: str | Path, **options: Any) -> TritonModelServer:
    """A server for ``REPO/NAME``, configured from its ``config.pbtxt``.

    Args:
        model_dir: the model folder (``config.pbtxt``, ``1/model.onnx``, a kernel library).
        options: further :class:`TritonModelServer` arguments (ports, host, threads, timeouts); the
            name, batching and library come from the config.

    Raises:
        DeployError: the folder fails :func:`gn_convert.deploy.triton_repo.check_model_dir`, its backend
            is not onnxruntime, it loads more than one library, or ``options`` name what the config sets.
        SessionError: onnxruntime cannot open the model (a blocked model on a CPU of another block: its
            kernels' own line).
    """
    model_dir = Path(model_dir)
    if not (model_dir / "config.pbtxt").is_file():
        raise DeployError(f"{model_dir} is not a model folder of a Triton repository (no config.pbtxt)")
    config = check_model_dir(model_dir)
    if config.backend != "onnxruntime":
        raise DeployError(f"{model_dir} is served by Triton's {config.backend or 'unnamed'} backend; gn-convert "
                          "serves onnxruntime models")
    taken = sorted(set(options) & {"name", "max_batch_size", "queue_delay_us", "native_ops", "blocked"})
    if taken:
        raise DeployError(f"{', '.join(taken)} come from {model_dir / 'config.pbtxt'}; drop them")
    libraries = [model_dir / Path(name).name for name in config.model_operations.op_library_filename]
    if len(libraries) > 1:
        raise DeployError(f"{model_dir} loads {len(libraries)} op libraries; gn-convert serves one at most")
    delay = config.dynamic_batching.max_queue_delay_microseconds if config.HasField("dynamic_batching") else 100
    return TritonModelServer(model_dir / VERSION / config.default_model_filename, name=config.name,
                             max_batch_size=config.max_batch_size, queue_delay_us=delay,
                             native_ops=libraries[0] if libraries else None, blocked=False, **options)
