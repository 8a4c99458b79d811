"""What a command writes on stderr while it works, each thing on lines of its own.

Three writers share stderr: the stage lines (``loading resnet50 ... 1.2 s``, written in two parts by
:class:`gn_convert.stages.Stages`: the message, then the time when the stage ends), the progress
bars (tqdm) and the library's log records. Left alone they interleave: a warning lands inside a
stage line (``calibrating on 4 batches of DIR ...WARNING ...``), a bar is drawn over the line of the
stage it belongs to, and a bar closed when the command ends is drawn again after later stages.
:class:`Console` orders them:

- a log record or a new bar that comes while a stage line is open ends that line first, and the
  stage's end then repeats its message (``calibrating on 4 batches of DIR ... 1.2 s``);
- a log record that comes while a bar is drawn clears the bar, is written, and the bar is drawn
  again below it (tqdm's external write mode);
- a stage that starts or ends closes the bars opened before it, so none is drawn again later.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO, TypeVar

Bar = TypeVar("Bar")


class Console:
    """The one writer of a command's progress on stderr (see the module docstring).

    Args:
        stream: where to write; None writes to ``sys.stderr`` as it is at each write.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self.open: str | None = None
        """The message of a stage line that waits for its end."""
        self.broken = False
        """Whether the open stage line was ended early (by a log record or a bar)."""
        self.bars: list[Any] = []

    def out(self) -> TextIO:
        """The stream written to."""
        return self.stream if self.stream is not None else sys.stderr

    def stage(self, text: str) -> None:
        """The sink of :class:`~gn_convert.stages.Stages`: a stage's message (no newline) or its end (one)."""
        self.close_bars()
        if not text.endswith("\n"):
            self.open, self.broken = text, False
        elif self.open is not None:
            text = self.open + text if self.broken else text
            self.open = None
        self._write(text)

    def end_line(self) -> None:
        """End an open stage line, so that what comes next starts a line of its own."""
        if self.open is not None and not self.broken:
            self._write("\n")
            self.broken = True

    def open_bar(self, make: Callable[[], Bar]) -> Bar:
        """A new progress bar (``make()`` draws it), on a line of its own, closed when the next stage starts or
        the current one ends."""
        self.end_line()
        bar = make()
        self.bars.append(bar)
        return bar

    def close_bars(self) -> None:
        """Close the bars still open (each leaves its last state on its line)."""
        for bar in self.bars:
            bar.close()
        self.bars.clear()

    def write_line(self, line: str) -> None:
        """A line of its own (a log record): below an open stage line, above the bars drawn."""
        from tqdm import tqdm

        self.end_line()
        with tqdm.external_write_mode(file=self.out()):
            self._write(line + "\n")

    def _write(self, text: str) -> None:
        out = self.out()
        out.write(text)
        out.flush()


class ConsoleHandler(logging.Handler):
    """A logging handler that writes each record as a line of its own through a :class:`Console`."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        """Write the formatted record (logging's own error handling on failure)."""
        try:
            self.console.write_line(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


CONSOLE = Console()
"""The console of the running command (stderr)."""
