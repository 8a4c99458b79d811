"""``gn-convert serve MODEL.onnx``: serve a model over the Triton protocols on this machine; ``gn-convert
serve REPO/NAME``: serve a model folder that ``gn-convert deploy`` wrote, as Triton's onnxruntime backend
runs it (:func:`gn_convert.deploy.repo_server.server_for_model_dir`)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from gn_convert.cli.arguments import add_native_library_argument

LOOPBACK = "127.0.0.1"
"""The default address (:data:`gn_convert.deploy.server.LOOPBACK`)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``serve`` command."""
    p = sub.add_parser(
        "serve", help="serve an exported model with a local Triton server (HTTP and gRPC)",
        description="Serve MODEL.onnx with a real Triton server (from nvidia-pytriton) running the "
        "model in onnxruntime, over the Triton HTTP and gRPC protocols (KServe v2), until "
        "Ctrl-C or SIGTERM. Given a model folder of a Triton repository (REPO/NAME, as `gn-convert deploy` "
        "writes it), serve it as Triton's onnxruntime backend would: its model, batching and kernel library "
        "from its config.pbtxt, and onnxruntime's own optimisations only.")
    p.add_argument("onnx", type=Path, metavar="MODEL.onnx|REPO/NAME", help="the exported model, or a model folder "
                   "of a Triton repository")
    p.add_argument("--host", default=LOOPBACK,
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, help="gRPC port (default: --port + 1)")
    p.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default: --port + 2)")
    p.add_argument("--name", help="model name (default: from the file or folder name)")
    p.add_argument("--max-batch-size", type=int,
                   help="largest batch the dynamic batcher forms (default 8; 0: no batching; a model folder's "
                   "comes from its config)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (default 0: its choice)")
    p.add_argument("--native", action="store_true",
                   help="run GroupNorm with gn-convert's native CPU kernel (built on first use; `gn-convert native`)")
    add_native_library_argument(p)
    p.add_argument("--startup-timeout", type=float, default=120.0,
                   help="seconds to wait for the server to be ready (default 120)")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit code."""
    from gn_convert.deploy.server import TritonModelServer, serve_until_signal

    ports: dict[str, Any] = {"host": args.host, "http_port": args.port, "grpc_port": args.grpc_port,
                             "metrics_port": args.metrics_port, "threads": args.threads,
                             "startup_timeout_s": args.startup_timeout}
    if args.onnx.is_dir():
        from gn_convert.deploy.repo_server import server_for_model_dir
        from gn_convert.errors import DeployError

        given = [flag for flag, value in (("--name", args.name), ("--max-batch-size", args.max_batch_size),
                                          ("--native", args.native or None), ("--native-library", args.native_library))
                 if value is not None]
        if given:
            raise DeployError(f"{', '.join(given)}: a model folder's name, batching and kernel library come from its "
                              "config.pbtxt; drop them")
        server = server_for_model_dir(args.onnx, **ports)
    else:
        native_ops = None
        if args.native:
            from gn_convert.native import resolve_library

            native_ops = resolve_library(args.native_library)
        max_batch_size = 8 if args.max_batch_size is None else args.max_batch_size
        server = TritonModelServer(args.onnx, name=args.name, max_batch_size=max_batch_size, native_ops=native_ops,
                                   **ports)
    if args.host not in (LOOPBACK, "localhost", "::1"):
        print(f"gn-convert: warning: listening on {args.host}: anyone who reaches it can run the model",
              file=sys.stderr)
    print(f"starting Triton for {server.name} (log: {server.log_file}) ...", file=sys.stderr)
    ended = serve_until_signal(server, on_ready=lambda: print(
        f"serving {server.name}: http://{server.http_url}/v2/models/{server.name}  grpc {server.grpc_url}  "
        f"(ready: http://{server.http_url}/v2/health/ready); Ctrl-C stops", flush=True))
    if ended:
        print(f"stopped on {signal.Signals(ended).name}", file=sys.stderr)
        return 0
    print("gn-convert: the server exited unexpectedly", file=sys.stderr)
    return 1
