"""Segmentation and video models in a real Triton server: the repository gn-convert writes for them
(two named per-pixel outputs; a 5-D clip input) is served, and every served output equals a local
onnxruntime session of the same file. Detection is written without batching (one image of any size)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

import gn_convert
from gn_convert.deploy.triton_repo import write_triton_repo
from gn_convert.tasks import TASKS
from gn_convert.testing.photos import nontrivial_batchnorm, photo_crops
from helpers.triton import STARTUP_TIMEOUT_S, client, client_module, parsed

try:
    import pytriton.triton  # noqa: F401
    import tritonclient.http  # noqa: F401
except ImportError as err:
    pytest.skip(f"the serve extra is not installed ({err.name}); pip install 'gn-convert[serve]'",
                allow_module_level=True)

pytestmark = pytest.mark.slow

CASES = {"segmentation": ("lraspp_mobilenet_v3_large", (64, 64)), "video": ("r3d_18", (16, 32, 32))}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    task_name = request.param
    name, size = CASES[task_name]
    task = TASKS[task_name]
    torch.manual_seed(0)
    model = task.build(name, num_classes=5)
    if task_name == "segmentation":
        nontrivial_batchnorm(model, size=size[-1], batch_size=2)
    converted = gn_convert.convert(model.eval(), 16)
    path = task.export(converted, tmp_path_factory.mktemp(task_name) / "model.onnx", input_size=size).path
    return task_name, path


@pytest.fixture(scope="module")
def served(exported: tuple[str, Path]) -> Iterator[tuple[str, Path, Any]]:
    task_name, path = exported
    server = gn_convert.TritonModelServer(path, name=task_name, http_port=0, max_batch_size=4,
                                          startup_timeout_s=STARTUP_TIMEOUT_S)
    try:
        yield task_name, path, server.start()
    finally:
        server.close()


def _inputs(task_name: str) -> np.ndarray:
    _, size = CASES[task_name]
    crops = photo_crops(3, size[-1], seed=5)
    if task_name == "video":  # clips: the crops repeated over 16 frames, with a drift
        crops = crops.unsqueeze(2) + torch.linspace(0, 0.5, size[0]).view(1, 1, -1, 1, 1)
    return crops.numpy().astype(np.float32)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_outputs_equal_local_onnxruntime(served: tuple[str, Path, Any], protocol: str) -> None:
    task_name, path, server = served
    local = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in local.get_outputs()]
    assert names == (["output"] if task_name == "video" else ["out"])
    x = _inputs(task_name)
    module = client_module(protocol)
    with client(server, protocol) as c:
        for batch in (x[:1], x):
            tensor = module.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            result = c.infer(task_name, [tensor])
            for name, want in zip(names, local.run(None, {"input": batch})):
                np.testing.assert_array_equal(result.as_numpy(name), want)


def test_repositories_of_dense_tasks_declare_their_shapes(exported: tuple[str, Path], tmp_path: Path) -> None:
    task_name, path = exported
    model_dir = write_triton_repo(path, tmp_path / "repo", name=task_name, labels=TASKS[task_name].labels(["a"] * 5))
    config = parsed(model_dir)
    assert config.max_batch_size == 8
    dims = {t.name: list(t.dims) for t in (*config.input, *config.output)}
    if task_name == "video":
        assert dims == {"input": [3, 16, 32, 32], "output": [5]}
        assert (model_dir / "labels.txt").read_text() == "a\n" * 5
    else:  # per-pixel classes along the channel axis: no labels file
        assert dims == {"input": [3, 64, 64], "out": [5, 64, 64]} and not (model_dir / "labels.txt").exists()
