"""Which onnxruntime providers a parity check asked for, and whether they can run here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gn_convert.errors import GnConvertError, ParityError
from gn_convert.runtime import NATIVE, PROVIDERS, check_provider, session_options

LEVELS: tuple[str, ...] = ("off", "all")


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


def parse_providers(text: str | list[str] | tuple[str, ...]) -> list[str]:
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
    here) and onnxruntime loads it.
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
