"""``gn-convert deploy MODEL.onnx --triton-repo DIR``: write a Triton model repository.

Without ``--native-library``, ``--native-ops`` builds the kernel for a portable ``-march``
(:data:`gn_convert.native.PORTABLE_MARCH`), never for this machine's CPU: the library runs on the server.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gn_convert.cli.arguments import add_native_library_argument
from gn_convert.cli.choices import LazyChoices
from gn_convert.errors import DeployError

DEFAULT_SERVER_REPO = "/models"
"""Where the Triton container mounts the repository (:data:`gn_convert.deploy.triton_repo.DEFAULT_SERVER_REPO`)."""
INSTANCE_CHOICES = LazyChoices("gn_convert.deploy.triton_repo:INSTANCE_KINDS")
TARGET_BLOCKS = (8, 16)
"""The NCHWc block sizes (:data:`gn_convert.deploy.blocked_target.TARGET_BLOCKS`)."""

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
    g.add_argument("--instance", choices=INSTANCE_CHOICES, default="cpu", metavar="KIND",
                   help="run the model instances on cpu (default) or gpu")
    g.add_argument("--instances", type=int, default=1, help="model instances (default 1; per GPU for gpu)")
    g.add_argument("--inlined", action="store_true",
                   help="ship the model with the GroupNorm function inlined (backends without ONNX "
                   "local functions, e.g. OpenVINO)")
    g.add_argument("--native-ops", action="store_true",
                   help="ship gn-convert's native GroupNorm kernel and load it with model_operations; it must "
                   "suit the server's CPU and onnxruntime (see docs/DEPLOY.md)")
    add_native_library_argument(g)
    g.add_argument("--blocked", action="store_true",
                   help="with --native-ops, ship the model rewritten for onnxruntime's blocked (NCHWc) layout: "
                   "faster, but only for CPUs of one block size and this onnxruntime (recorded in the model's "
                   "metadata and the config's comments; its kernels refuse other CPUs when the server loads it)")
    g.add_argument("--target-block", type=int, choices=TARGET_BLOCKS, metavar="{8,16}",
                   help="with --blocked, the servers' block size: 16 for x86-64 CPUs with AVX-512F, 8 for other "
                   "x86-64 CPUs (default: this machine's; another one is refused: write the model on a machine "
                   "of the target family)")
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
    from gn_convert.deploy.labels import labels_beside, read_labels
    from gn_convert.deploy.triton_repo import write_triton_repo

    labels = read_labels(args.labels) if args.labels else labels_beside(args.onnx)
    native_ops = None
    if args.native_ops:
        from gn_convert.native import resolve_library

        native_ops = resolve_library(args.native_library, portable=True)
    elif args.native_library is not None:
        raise DeployError("--native-library names the kernel to ship with --native-ops; add --native-ops")
    model_dir = write_triton_repo(
        args.onnx, args.triton_repo, name=args.name, max_batch_size=args.max_batch_size,
        instance=args.instance, instance_count=args.instances, inlined=args.inlined, labels=labels,
        native_ops=native_ops, blocked=args.blocked, target_block=args.target_block, server_repo=args.server_repo,
        force=args.force)
    blocked = " (the blocked-layout model for this CPU family: see the config's comments)" if args.blocked else ""
    print(f"wrote {model_dir} (config checked with Triton's model-config schema){blocked}")
    gpus = "--gpus=all " if args.instance == "gpu" else ""
    print(f"serve it: docker run --rm {gpus}-p 8000:8000 -p 8001:8001 -p 8002:8002 -v {model_dir.parent}:"
          f"{args.server_repo} {TRITON_IMAGE} tritonserver --model-repository={args.server_repo}")
    return 0


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The Triton options of the main ``gn-convert MODEL`` command."""
    g = parser.add_argument_group("deploy: Triton model repository")
    g.add_argument("--triton-repo", type=Path, metavar="DIR",
                   help="also write model.onnx into this Triton model repository (see `gn-convert deploy -h`)")
    g.add_argument("--triton-name", metavar="NAME",
                   help="model name in the repository (default: the output folder's name)")
    g.add_argument("--triton-instance", choices=INSTANCE_CHOICES, default="cpu", metavar="KIND",
                   help="run the Triton model instances on cpu (default) or gpu")
