"""Timing named stages of a long job, with an optional one-line progress report per stage."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


class Stages:
    """Times named stages; reports each stage's start and duration to ``sink`` (or the log).

    Args:
        sink: called with text fragments (``"loading resnet50 ..."``, then ``" 1.2 s\\n"``): the
            CLI passes a writer to stderr. None sends one log line per finished stage instead.
    """

    def __init__(self, sink: Callable[[str], None] | None = None) -> None:
        self.timings: dict[str, float] = {}
        self.sink = sink

    @contextlib.contextmanager
    def __call__(self, key: str, message: str) -> Iterator[None]:
        """Run a stage: report ``message``, time the block, report its duration."""
        if self.sink is not None:
            self.sink(f"{message} ...")
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            if self.sink is not None:
                self.sink(" failed\n")
            raise
        self.timings[key] = round(time.perf_counter() - start, 3)
        if self.sink is not None:
            self.sink(f" {self.timings[key]:.1f} s\n")
        else:
            log.info("%s: %.1f s", message, self.timings[key])

    def total(self) -> float:
        """Seconds spent in all stages so far."""
        return sum(self.timings.values())
