"""Requests per second and p50/p99 latency of a converted model served by Triton, next to a
local onnxruntime session of the same file.

The model (default resnet18, untrained weights: timing does not depend on their values) is
converted to GroupNorm, exported in the custom-op ``function`` form, and served by
:class:`gn_convert.deploy.TritonModelServer` on loopback. Three paths answer the same batch-1
requests, interleaved in rounds so that machine drift hits them alike:

- ``onnxruntime (local)``: ``session.run`` in this process;
- ``triton http`` / ``triton grpc``: one ``tritonclient`` request at a time (sequential);
  with ``--clients N`` also N concurrent clients over each protocol.

Usage::

    python scripts/bench_serve.py [--model resnet18] [--size 224] [--requests 200] [--clients 4]
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from gn_convert import convert
from gn_convert.deploy import TritonModelServer
from gn_convert.load.names import build_model
from gn_convert.onnx.export import export_onnx

CLIENTS = {"http": httpclient, "grpc": grpcclient}


def export(model_name: str, size: int, folder: Path) -> Path:
    """``model_name`` (untrained), converted and exported at batch 1, ``size`` x ``size``."""
    model = convert(build_model(model_name)).eval()
    return export_onnx(model, folder / f"{model_name}.onnx", input_shape=(1, 3, size, size)).path


def served_call(server: TritonModelServer, protocol: str, name: str) -> tuple[Callable[[np.ndarray], Any], Any]:
    """A function sending one request over ``protocol``, and its client (to close)."""
    module = CLIENTS[protocol]
    client = module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)

    def call(x: np.ndarray) -> Any:
        tensor = module.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer(name, [tensor]).as_numpy("output")

    return call, client


def timed(call: Callable[[np.ndarray], Any], inputs: list[np.ndarray]) -> list[float]:
    """Latency in seconds of each call, one after another."""
    latencies = []
    for x in inputs:
        start = time.perf_counter()
        call(x)
        latencies.append(time.perf_counter() - start)
    return latencies


def concurrent(make_call: Callable[[], tuple[Callable, Any]], inputs: list[np.ndarray],
               clients: int) -> tuple[list[float], float]:
    """Latencies and wall time of ``inputs`` spread over ``clients`` threads, one client each."""
    def worker(part: list[np.ndarray]) -> list[float]:
        call, client = make_call()
        try:
            return timed(call, part)
        finally:
            client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parts = pool.map(worker, [inputs[i::clients] for i in range(clients)])
        latencies = [t for part in parts for t in part]
    return latencies, time.perf_counter() - start


def row(label: str, latencies: list[float], wall: float, base: float | None) -> str:
    ms = np.array(latencies) * 1e3
    rps = len(latencies) / wall
    ratio = f"{base / rps:6.2f}x" if base else "     -"
    return (f"{label:<26} {len(latencies):>5} {rps:>10.1f} {np.percentile(ms, 50):>9.2f} "
            f"{np.percentile(ms, 99):>9.2f}   {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per path (default 200)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients, 0 to skip (default 4)")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads, both sides (default 0)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = export(args.model, args.size, Path(tmp))
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        inputs = [rng.standard_normal((1, 3, args.size, args.size), dtype=np.float32)
                  for _ in range(args.requests)]
        with TritonModelServer(path, name=args.model, http_port=0,
                               threads=args.threads) as server:
            paths: dict[str, Callable[[np.ndarray], Any]] = {"onnxruntime (local)": lambda x: session.run(None, {"input": x})}
            opened = []
            for protocol in CLIENTS:
                call, client = served_call(server, protocol, args.model)
                paths[f"triton {protocol}"] = call
                opened.append(client)
            for call in paths.values():  # warm-up
                timed(call, inputs[:5])
            latencies: dict[str, list[float]] = {label: [] for label in paths}
            walls = dict.fromkeys(paths, 0.0)
            for r in range(args.rounds):
                chunk = inputs[r::args.rounds]
                for label, call in paths.items():
                    start = time.perf_counter()
                    latencies[label] += timed(call, chunk)
                    walls[label] += time.perf_counter() - start
            results = [(label, latencies[label], walls[label]) for label in paths]
            if args.clients:
                for protocol in CLIENTS:
                    lat, wall = concurrent(functools.partial(served_call, server, protocol, args.model), inputs,
                                           args.clients)
                    results.append((f"triton {protocol}, {args.clients} clients", lat, wall))
            for client in opened:
                client.close()

    base = len(results[0][1]) / results[0][2]
    print(f"{args.model}, batch 1, {args.size}x{args.size}, GroupNorm custom-op function form, "
          f"{args.requests} requests per path, onnxruntime {ort.__version__}")
    print(f"{'path':<26} {'n':>5} {'requests/s':>10} {'p50 ms':>9} {'p99 ms':>9}   time vs local")
    for label, lat, wall in results:
        print(row(label, lat, wall, None if label.startswith("onnxruntime") else base))


if __name__ == "__main__":
    main()
