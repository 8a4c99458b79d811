"""Which providers a parity check asked for (onnxruntime's, and OpenVINO's CPU runtime), and whether they can run here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gn_convert.errors import GnConvertError, ParityError
from gn_convert.runtime import NATIVE, PROVIDERS, check_provider, session_options

LEVELS: tuple[str, ...] = ("off", "all")
BLOCKED = "blocked"
"""A parity row of ``cpu-native`` at level ``all`` on onnxruntime's blocked layout, as gn-convert's own
sessions run it; ``cpu-native``'s ``all`` row is the plain kernel under every onnxruntime
optimisation, as a server that registers the library (Triton's ``model_operations``) runs it."""


@dataclass(frozen=True)
class Availability:
    """Whether a requested provider can run here, and why not.

    Attributes:
        name: the short provider name.
        available: whether it can run.
        reason: why not.
        library: the native kernel library, for ``cpu-native``.
    """

    name: str
    available: bool
    reason: str = ""
    library: Path | None = None


def parse_providers(text: str | Sequence[str]) -> list[str]:
    """``"cpu,cuda"`` (or a list) -> checked short names, in order, without repeats.

    Raises:
        ParityError: an unknown provider name.
    """
    names = text.split(",") if isinstance(text, str) else list(text)
    result: list[str] = []
    for name in (n.strip().lower() for n in names if n.strip()):
        if name not in PROVIDERS:
            raise ParityError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
        if name not in result:
            result.append(name)
    if not result:
        raise ParityError("no provider given; use for example --providers cpu,cuda")
    return result


def availability(name: str, library: str | Path | None = None) -> Availability:
    """Whether onnxruntime here offers the provider (a GPU is checked when a session starts).

    ``cpu-native`` is available where the kernel library exists (``library``, or a build made
    here) and onnxruntime loads it; ``openvino`` and ``openvino-default`` where openvino is installed.
    """
    try:
        check_provider(name)
        if name != NATIVE:
            return Availability(name, True)
        from gn_convert.native import resolve_library

        path = resolve_library(library)
        session_options(library=path)  # loads it: a library onnxruntime refuses is not available
        return Availability(name, True, library=path)
    except GnConvertError as err:
        return Availability(name, False, str(err))


def levels_for(provider: Availability, levels: Sequence[str], rank: int = 4) -> list[str]:
    """The rows one provider runs: ``levels``, and for ``cpu-native`` with ``all`` also
    :data:`BLOCKED` where this CPU has onnxruntime's blocked layout and the input is an image batch
    (``rank`` 4: onnxruntime's blocked layout holds 2-D convolutions only, not a clip's 3-D ones).
    OpenVINO's providers run their two shape modes instead (``dynamic``: the file as it is; ``static``:
    the model reshaped to each batch before compiling)."""
    if provider.name.startswith("openvino"):  # OpenVINO has no optimisation levels: its rows are its shape modes
        from gn_convert.runtime.openvino import SHAPE_MODES

        return list(SHAPE_MODES)
    rows = list(levels)
    if provider.name == NATIVE and "all" in rows and rank == 4:
        from gn_convert.native.nchwc import block_size

        if block_size() in (8, 16):
            rows.insert(rows.index("all") + 1, BLOCKED)
    return rows


def session_kwargs(provider: Availability, level: str) -> dict[str, Any]:
    """``open_session`` keyword arguments for one row (a level of :data:`LEVELS`, :data:`BLOCKED`, or an OpenVINO
    shape mode)."""
    if level == BLOCKED:
        return {"level": "all", "library": provider.library, "blocked": True}
    if provider.name.startswith("openvino"):
        return {"level": level}
    return {"level": level, "library": provider.library, "blocked": False if provider.library is not None else None}
