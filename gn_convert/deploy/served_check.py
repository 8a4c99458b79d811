"""The check that a model shipped with the native kernel computes, as the server will run it, what
its plain ONNX form computes.

Triton's onnxruntime backend registers the library named in ``model_operations`` and opens the
model with every onnxruntime optimisation: the **plain** kernel (gn-convert's blocked-layout
rewrite is its own, never the server's). :func:`check_served` opens exactly that session and
compares it, on random inputs of every kind at batch 1 and 3 with two seeds, with the same file
run without the library (onnxruntime inlines the op's ONNX function body).

A blocked-layout model (``deploy --native-ops --blocked``) is written by the same child, with the
library shipped (:func:`gn_convert.native.nchwc.nchwc_model`, which checks its rewrite itself), and
then checked the same way, as the server runs it (the library registered, every optimisation, which
finds nothing more to do in an optimised model), against the original model without the library.

It runs in a child process: a library built for another CPU (``--march`` newer than this
machine's) would kill this one with SIGILL; there it is reported as one line instead.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from gn_convert.errors import DeployError

TOLERANCE = 1e-3
"""Largest error of the served session, relative to the output's largest value (the kernel and the
function body differ by float32 rounding, about 1e-6; a wrong kernel by about 1)."""
TIMEOUT_S = 600


def check_served(model: str | Path, library: str | Path, timeout_s: float = TIMEOUT_S, *,
                 blocked_from: str | Path | None = None) -> float:
    """Compare the server's session of ``model`` (``library`` registered, level ``all``, the file as
    it is) with the model without the library; return the largest relative error.

    Args:
        model: the model file the server opens.
        library: the kernel library the server registers.
        timeout_s: the child process's time limit.
        blocked_from: first write ``model`` as this model rewritten for this CPU's blocked layout with
            ``library``; the reference is then this model, without the library.

    Raises:
        DeployError: they differ, either session fails, nothing moves onto the blocked layout, or the
            library cannot run on this CPU (the message says which, in one line).
    """
    command = [sys.executable, "-m", "gn_convert.deploy.served_check", str(model), str(library)]
    if blocked_from is not None:
        command.append(str(blocked_from))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise DeployError(f"the served-configuration check of {model} took over {timeout_s:.0f} s") from None
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise DeployError(f"the kernel library {library} crashed onnxruntime on this machine ({name}: built for "
                          "another CPU?); build it for a CPU this machine can run (`gn-convert native --march "
                          "x86-64-v2`), or check the model on the server's CPU")
    lines = (done.stdout.strip() or done.stderr.strip() or "no output").splitlines()
    if done.returncode != 0:
        raise DeployError(lines[-1])
    return float(lines[-1])


def _main(model: str, library: str, blocked_from: str | None = None) -> float:
    from gn_convert.runtime import open_session
    from gn_convert.runtime.compare import compare_sessions

    if blocked_from is not None:
        _write_blocked(Path(blocked_from), Path(library), Path(model))
    reference = open_session(blocked_from or model, level="all")
    served = open_session(model, level="all", library=library, blocked=False)
    if blocked_from is not None:
        what, hint = "the blocked-layout model as the server runs it", "deploy without --blocked and report this"
    else:
        what, hint = "the native kernel as the server runs it", "ship the model without --native-ops and report this"
    return compare_sessions(reference, served, what, DeployError, TOLERANCE, hint=hint)


def _write_blocked(source: Path, library: Path, out: Path) -> None:
    """Write ``source`` rewritten for this CPU's blocked layout with ``library`` to ``out`` (atomically)."""
    from gn_convert.atomic import atomic_file
    from gn_convert.native.nchwc import nchwc_model

    data, fused = nchwc_model(source, library)
    if not fused:
        raise DeployError(f"no GroupNorm of {source} runs on onnxruntime's blocked layout (none follows a "
                          "convolution); deploy it without --blocked")
    with atomic_file(out) as staged:
        staged.write_bytes(data)


if __name__ == "__main__":
    from gn_convert.errors import GnConvertError

    try:
        print(_main(*sys.argv[1:4]))
    except GnConvertError as err:
        print(err)
        sys.exit(1)
