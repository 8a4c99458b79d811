"""A three-node ONNX model that crashes OpenVINO's CPU plugin (segmentation fault) when compiled with static shapes.

Found while deploying GroupNorm models (issue 31): the ``standard`` export of ResNet-50 (one
``GroupNormalization``-21 per layer) compiles with a dynamic batch, and kills the process when the model
is reshaped to a static batch before ``compile_model``. Bisected to::

    x [1, 4, 2, 2] -> Relu -> GroupNormalization(num_groups=2) -> Add(gn, relu) -> y

Every case runs in its own child process (a segfault kills the interpreter) and the table prints its exit
status. Measured with OpenVINO 2026.4.1 (pip wheel, CPU plugin, Intel Xeon with AVX-512 and AMX):

- ``static`` (the file's batch is 1) and ``reshaped`` (a dynamic-batch file after ``model.reshape``):
  SIGSEGV inside ``compile_model``, in a matcher pass of the CPU plugin's transformation pipeline;
- ``dynamic`` (batch left dynamic): compiles and runs;
- ``static`` with ``SNIPPETS_MODE=DISABLE``: compiles and runs, so the crash is in the snippets tokenization,
  which wraps a static-shape GroupNormalization in its own Subgraph (``TokenizeGNSnippets``); the common
  elementwise tokenization then meets an Add whose inputs are that Subgraph's output and an elementwise op
  that also feeds it;
- the same graph with the Add's second input the model's input (not an op), or a Relu between the
  GroupNormalization and the Add: compiles and runs;
- ``num_groups=1`` does not crash; every other group count tried did (C from 4 to 2048, H from 2 to 56),
  except C=256 at 56x56 with 32 groups (what ResNet-50's first stage has, so its crash comes at stage 3).

Usage::

    python scripts/openvino_segfault_repro.py                 # the table
    python scripts/openvino_segfault_repro.py --save repro.onnx   # also write the model, to attach to a report
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh

CASES: dict[str, tuple[str, int | str, dict[str, str], bool]] = {
    "static": ("relu", 1, {}, False),
    "reshaped": ("relu", "N", {}, True),
    "dynamic": ("relu", "N", {}, False),
    "static, SNIPPETS_MODE=DISABLE": ("relu", 1, {"SNIPPETS_MODE": "DISABLE"}, False),
    "static, Add of the model input": ("input", 1, {}, False),
    "static, Relu between GN and Add": ("relu-after", 1, {}, False),
}
"""name -> (residual form, batch dimension, extra compile properties, reshape to batch 1 before compiling)."""

CHILD = """
import json, sys
import numpy as np, openvino as ov
path, config, reshape = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] == "1"
core = ov.Core()
model = core.read_model(path)
if reshape:
    model.reshape([1, 4, 2, 2])
compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", **config})
out = compiled(np.ones((1, 4, 2, 2), np.float32))[0]
print(float(np.abs(out).max()))
"""
"""What each child process runs: read, optionally reshape, compile on the CPU, infer once."""


def build(residual: str = "relu", batch: int | str = 1, channels: int = 4, size: int = 2, groups: int = 2) -> onnx.ModelProto:
    """The model: ``Relu -> GroupNormalization -> Add(gn, relu)`` (``residual="relu"``), or a variant that does not
    crash: the Add's second input the model input (``"input"``), or a Relu after the GroupNormalization (``"relu-after"``)."""
    rng = np.random.default_rng(0)
    shape = [batch, channels, size, size]
    nodes = [oh.make_node("Relu", ["x"], ["r"]),
             oh.make_node("GroupNormalization", ["r", "scale", "bias"], ["g"], num_groups=groups, epsilon=1e-5)]
    if residual == "relu-after":
        nodes += [oh.make_node("Relu", ["g"], ["g2"]), oh.make_node("Add", ["g2", "r"], ["y"])]
    else:
        nodes.append(oh.make_node("Add", ["g", "r" if residual == "relu" else "x"], ["y"]))
    graph = oh.make_graph(nodes, "relu_groupnorm_add", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, shape)],
                          [onh.from_array(rng.uniform(0.5, 2, channels).astype(np.float32), "scale"),
                           onh.from_array(rng.uniform(-1, 1, channels).astype(np.float32), "bias")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    return model


def run_case(path: Path, config: dict[str, str], reshape: bool, timeout: float = 300) -> str:
    """Compile and run ``path`` in a child process; ``ok``, the signal that killed it, or the error's last line."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(config), "1" if reshape else "0"],
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode < 0:
        return f"crashed ({signal.Signals(-done.returncode).name})"
    if done.returncode:
        return f"error: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return "ok"


def main(argv: list[str] | None = None) -> int:
    """Print each case's outcome (as JSON with ``--json``); 0 unless openvino is missing."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", type=Path, help="also write the crashing model (static batch 1) here")
    parser.add_argument("--json", action="store_true", help="print the outcomes as one JSON object")
    args = parser.parse_args(argv)
    try:
        import openvino
    except ImportError:
        print("openvino is not installed (pip install openvino)", file=sys.stderr)
        return 2
    import tempfile

    outcomes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ov-repro-") as tmp:
        for name, (residual, batch, config, reshape) in CASES.items():
            path = Path(tmp) / f"case{len(outcomes)}.onnx"
            onnx.save(build(residual, batch), path)
            outcomes[name] = run_case(path, config, reshape)
    if args.save:
        onnx.save(build(), args.save)
    if args.json:
        print(json.dumps({"openvino": openvino.__version__, "outcomes": outcomes}))
        return 0
    print(f"OpenVINO {openvino.__version__}, CPU; model: x[batch,4,2,2] -> Relu -> GroupNormalization(G=2) -> "
          "Add(gn, relu)")
    for name, outcome in outcomes.items():
        print(f"  {name:34s} {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
