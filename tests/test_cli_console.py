"""The command's stderr while it works: stage lines, progress bars and log records each on lines of their own."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tqdm import tqdm

from gn_convert.cli.console import Console, ConsoleHandler


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("gn_convert.data.folders", logging.WARNING, __file__, 1, message, None, None)


def test_a_log_record_during_a_stage_gets_its_own_line_and_the_stage_is_told_again() -> None:
    """Defect: "calibrating on 4 batches of txtdir ...WARNING gn_convert.data.folders: ..." on one line."""
    stream = io.StringIO()
    console = Console(stream)
    handler = ConsoleHandler(console)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console.stage("calibrating on 4 batches of txtdir ...")
    handler.emit(_record("txtdir: skipped 3 unreadable image files"))
    handler.emit(_record("a second one"))
    console.stage(" 1.2 s\n")
    console.stage("saving to out ...")
    console.stage(" 0.0 s\n")
    assert stream.getvalue().splitlines() == [
        "calibrating on 4 batches of txtdir ...",
        "WARNING gn_convert.data.folders: txtdir: skipped 3 unreadable image files",
        "WARNING gn_convert.data.folders: a second one",
        "calibrating on 4 batches of txtdir ... 1.2 s",
        "saving to out ... 0.0 s",  # a stage nothing interrupted stays one line, written once
    ]


def test_a_bar_starts_below_its_stage_and_is_closed_when_the_stage_ends() -> None:
    """Defect: the recovery bar was drawn over its stage's line, and again after 'checking parity' when the
    command closed it at its end."""
    stream = io.StringIO()
    console = Console(stream)
    console.stage("recovering within 8 s ...")
    bar = console.open_bar(lambda: tqdm(total=8, desc="recovering", file=stream, ascii=True))
    bar.update(8)
    console.write_line("WARNING a record while the bar is drawn")
    console.stage(" 8.7 s\n")
    console.stage("checking parity on cpu ...")
    console.stage(" 1.1 s\n")
    bar.close()  # the command closes it again at its end: nothing more is drawn
    lines = [line.rsplit("\r", 1)[-1] for line in stream.getvalue().split("\n")]
    assert lines[0] == "recovering within 8 s ..."
    assert lines[-3:] == ["recovering within 8 s ... 8.7 s", "checking parity on cpu ... 1.1 s", ""]
    assert "WARNING a record while the bar is drawn" in lines
    after = stream.getvalue().split("recovering within 8 s ... 8.7 s")[1]
    assert "recovering:" not in after


@pytest.mark.slow
def test_the_command_keeps_warnings_and_the_bar_off_its_stage_lines(tmp_path: Path, nontrivial) -> None:
    """The whole command (a child process, so that its own logging configuration applies)."""
    import torch
    from torchvision.utils import save_image

    from gn_convert.testing.photos import photo_crops

    photos = tmp_path / "photos"
    photos.mkdir()
    for index, crop in enumerate(photo_crops(12, 32, seed=3)):
        save_image(crop.clamp(0, 1), photos / f"p{index}.png")
    for index in range(3):
        (photos / f"broken{index}.jpg").write_text("not an image")  # a warning while the data are read
    weights = tmp_path / "teacher.pt"
    torch.save(nontrivial("mobilenet_v3_small").state_dict(), weights)
    argv = [sys.executable, "-m", "gn_convert", "mobilenet_v3_small", "--weights", str(weights), "--no-onnx",
            "--data", str(photos), "--recover", "--budget", "3", "--input-size", "32", "--out", str(tmp_path / "o")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line.rsplit("\r", 1)[-1] for line in done.stderr.split("\n")]
    assert all(line.startswith("WARNING") for line in lines if "WARNING" in line), done.stderr
    assert any(line.startswith("WARNING gn_convert.data.folders:") for line in lines), done.stderr
    ended = [k for k, line in enumerate(lines) if re.fullmatch(r"recovering within 3 s \.\.\. [0-9.]+ s", line)]
    assert len(ended) == 1, done.stderr
    assert not any("recovering:" in line for line in lines[ended[0] + 1:]), done.stderr
