"""Stage timing and progress lines for the CLI."""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Iterator


class Stages:
    """Times named stages and prints one progress line per stage to stderr."""

    def __init__(self, quiet: bool = False) -> None:
        self.timings: dict[str, float] = {}
        self.quiet = quiet

    @contextlib.contextmanager
    def __call__(self, key: str, message: str) -> Iterator[None]:
        """Run a stage: print ``message``, time the block, print its duration."""
        if not self.quiet:
            print(f"{message} ...", end="", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if not self.quiet:
                print(" failed", file=sys.stderr)
            raise
        self.timings[key] = round(time.perf_counter() - start, 3)
        if not self.quiet:
            print(f" {self.timings[key]:.1f} s", file=sys.stderr)

    def total(self) -> float:
        """Seconds spent in all stages so far."""
        return sum(self.timings.values())
