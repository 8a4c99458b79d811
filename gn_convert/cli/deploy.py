"""``gn-convert deploy MODEL.onnx --triton-repo DIR``: write a Triton model repository."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..deploy.errors import DeployError
from ..deploy.extra import model_config_pb2
from ..deploy.labels import labels_beside, read_labels
from ..deploy.triton_repo import DEFAULT_SERVER_REPO, INSTANCE_KINDS, default_name, write_triton_repo
from .stages import Stages

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"
"""Triton 2.51, the server version nvidia-pytriton 0.7 ships (what `gn-convert serve` runs)."""


def add_repo_arguments(parser: argparse.ArgumentParser) -> None:
    """The Triton repository options of the ``deploy`` command."""
    g = parser.add_argument_group("Triton model repository")
    g.add_argument("--triton-repo", type=Path, required=True, metavar="DIR",
                   help="write the model into this Triton model repository (DIR/NAME/config.pbtxt, "
                   "DIR/NAME/1/model.onnx)")
    g.add_argument("--name", help="model name in the repository (default: from the file or folder name)")
    g.add_argument("--max-batch-size", type=int, default=8,
                   help="largest batch Triton's dynamic batcher forms (default 8; 0: no batching)")
    g.add_argument("--instance", choices=INSTANCE_KINDS, default="cpu",
                   help="run the model instances on cpu (default) or gpu")
    g.add_argument("--instances", type=int, default=1, help="model instances (default 1; per GPU for gpu)")
    g.add_argument("--inlined", action="store_true",
                   help="ship the model with the GroupNorm function inlined (backends without ONNX "
                   "local functions, e.g. OpenVINO)")
    g.add_argument("--native-ops", action="store_true",
                   help="ship gn-convert's native GroupNorm kernel (built here, `gn-convert native`) and load "
                   "it with model_operations; it must suit the server's CPU and onnxruntime (see README)")
    g.add_argument("--server-repo", default=DEFAULT_SERVER_REPO,
                   help="where the server mounts the repository, for the library's path (default /models)")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``deploy`` command."""
    p = sub.add_parser(
        "deploy", help="write a Triton model repository for an exported model",
        description="Write MODEL.onnx into a Triton model repository (onnxruntime backend, "
        "tensors read from the graph, dynamic batching), checked with Triton's own config schema.")
    p.add_argument("onnx", type=Path, metavar="MODEL.onnx", help="the exported model")
    add_repo_arguments(p)
    p.add_argument("--labels", type=Path, metavar="FILE|CHECKPOINT",
                   help="class names: a text file (one a line) or a gn-convert checkpoint folder "
                   "(default: the checkpoint MODEL.onnx lies in, if it records them)")
    p.add_argument("--force", action="store_true", help="replace the model if the repository has it")


def run(args: argparse.Namespace) -> int:
    """Write the repository entry; returns the exit code."""
    labels = read_labels(args.labels) if args.labels else labels_beside(args.onnx)
    native_ops = None
    if args.native_ops:
        from ..native import build_library

        native_ops = build_library()
    model_dir = write_triton_repo(
        args.onnx, args.triton_repo, name=args.name, max_batch_size=args.max_batch_size,
        instance=args.instance, instance_count=args.instances, inlined=args.inlined, labels=labels,
        native_ops=native_ops, server_repo=args.server_repo, force=args.force)
    print(f"wrote {model_dir} (config checked with Triton's model-config schema)")
    gpus = "--gpus=all " if args.instance == "gpu" else ""
    print(f"serve it: docker run --rm {gpus}-p 8000:8000 -p 8001:8001 -p 8002:8002 -v {model_dir.parent}:"
          f"{args.server_repo} {TRITON_IMAGE} tritonserver --model-repository={args.server_repo}")
    return 0


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The Triton options of the main ``gn-convert MODEL`` command."""
    g = parser.add_argument_group("Triton model repository")
    g.add_argument("--triton-repo", type=Path, metavar="DIR",
                   help="also write model.onnx into this Triton model repository (see `gn-convert deploy -h`)")
    g.add_argument("--triton-name", help="model name in the repository (default: the output folder's name)")
    g.add_argument("--triton-instance", choices=INSTANCE_KINDS, default="cpu",
                   help="run the Triton model instances on cpu (default) or gpu")


def _triton_name(args: argparse.Namespace, out: Path) -> str:
    return args.triton_name or default_name(out / "model.onnx")


def check_pipeline_arguments(args: argparse.Namespace, out: Path) -> None:
    """Fail before any work when ``--triton-repo`` or ``--native`` cannot be honoured.

    Raises:
        DeployError: ``--no-onnx`` was given with either, ``--native`` with another ONNX target
            than ``function`` or with GPU instances, or the repository already has the model
            (without ``--force``).
        NativeBuildError: ``--native`` was given and the kernel cannot be built here.
        ServeExtraMissingError: ``tritonclient`` is not installed.
    """
    if getattr(args, "native", False):
        if getattr(args, "no_onnx", False):
            raise DeployError("--native checks and ships model.onnx on the native kernel; drop --no-onnx")
        if getattr(args, "onnx_target", "function") != "function":
            raise DeployError(f"the native kernel runs the custom op of the function target; the "
                              f"{args.onnx_target} target has none: drop --onnx-target or --native")
        if getattr(args, "triton_instance", "cpu") != "cpu" and getattr(args, "triton_repo", None) is not None:
            raise DeployError("the native GroupNorm kernel runs on CPU instances; use --triton-instance cpu "
                              "or drop --native")
        from ..native import build_library

        build_library()
    if getattr(args, "triton_repo", None) is None:
        return
    if getattr(args, "no_onnx", False):
        raise DeployError("--triton-repo needs model.onnx; drop --no-onnx")
    model_config_pb2()
    target = args.triton_repo / _triton_name(args, out)
    if target.exists() and not args.force:
        raise DeployError(f"{target} exists; pass --force to replace it or choose another --triton-name")


def pipeline_stage(args: argparse.Namespace, folder: Path, out: Path, categories: list[str] | None,
                   stages: Stages, parity_failed: bool = False) -> dict[str, object]:
    """Write the pipeline's ``model.onnx`` into ``--triton-repo`` (nothing without it).

    A model whose parity check failed is not deployed: the repository is left alone and the
    report says why.

    Args:
        args: the main command's parsed options.
        folder: the (staged) output folder holding ``model.onnx``.
        out: the final output folder (its name is the default model name).
        categories: the source weights' class names, for ``labels.txt``, or None.
        stages: the command's stage timer.
        parity_failed: the pipeline's parity check failed.

    Returns:
        The fields for ``report.json`` (``triton``), empty without ``--triton-repo``.
    """
    if getattr(args, "triton_repo", None) is None:
        return {}
    name = _triton_name(args, out)
    if parity_failed:
        print(f"gn-convert: not writing Triton model {name}: the ONNX model failed its parity check "
              "(see report.json)", file=sys.stderr)
        return {"triton": {"skipped": "parity failed", "name": name}}
    native_ops = None
    if getattr(args, "native", False):
        from ..native import build_library

        native_ops = build_library()
    with stages("triton", f"writing Triton model {name} into {args.triton_repo}"):
        model_dir = write_triton_repo(folder / "model.onnx", args.triton_repo, name=name,
                                      instance=args.triton_instance, labels=categories, native_ops=native_ops,
                                      force=args.force)
    return {"triton": {"model_dir": str(model_dir), "name": name, "instance": args.triton_instance,
                       "labels": bool(categories), "native_ops": native_ops is not None}}
