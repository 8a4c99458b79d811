"""A property over the whole file-system surface: whatever the options, and whatever the exit code, no
file gn-convert did not write changes or disappears, and no temporary side file is left behind.

Hypothesis draws sequences of commands (convert with or without a Triton repository, finetune,
deploy) with ``--out``, ``--force``, ``--triton-repo``, ``--triton-name``/``--name`` and
``--state-dir`` chosen among relative, absolute, nested and symlinked paths, existing user folders,
earlier outputs, the current folder and the one above it, in a workspace where user files already
lie (in a folder an output may land in, behind a symbolic link, in a Triton repository). Before and
after each command every user file is hashed. The model is a tiny BatchNorm network that stands in
for every name (what is under test is where files go, not the conversion), so each command takes
about a second.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e '.[test]')")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gn_convert.cli import main  # noqa: E402

USER_FILES = {
    "notes.txt": "my notes",
    "userdir/a.txt": "a",
    "userdir/sub/b.txt": "b",
    "target/t.txt": "behind the link",
    "repo/theirs/config.pbtxt": 'name: "theirs"',
    "repo/theirs/1/model.onnx": "not ours",
    "proj/src/train.py": "print('train')",
}
SIDE = re.compile(r"^\..+\.(tmp|partial|old)$")

OUTS = st.sampled_from(["out", "out", "first", "ABS/abs_out", "nest/deeper/out", "userdir", "userdir/sub", "link",
                        "emptylink", "emptylink", "proj", "proj", ".", "..", "repo", "repo/m1", "out/inner"])
REPOS = st.sampled_from([None, "repo", "out/repo", "out", "userdir", "ABS/repo2", "link"])
NAMES = st.sampled_from([None, "m1", "theirs", ".", "..", "a/b", "out"])
STATES = st.sampled_from([None, "state", "userdir", "userdir", "out/state", "ABS/state2", "proj/src"])
COMMANDS = st.fixed_dictionaries({
    "kind": st.sampled_from(["convert", "convert", "convert", "finetune", "deploy", "save"]),
    "out": OUTS, "force": st.booleans(), "repo": REPOS, "name": NAMES, "state": STATES, "onnx": st.booleans(),
    "add_file": st.booleans(),
})


class Tiny(nn.Module):
    """A stand-in for every model name: conv, BatchNorm with measured-looking statistics, classifier."""

    def __init__(self, num_classes: int = 1000, **_: object) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, stride=8), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)
        if not self.bn.running_mean.is_meta:
            with torch.no_grad():
                self.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, 8))
                self.bn.running_var.copy_(torch.linspace(0.5, 2.0, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def hashes(root: Path, files: dict[str, str]) -> dict[str, str]:
    """Those of ``files`` (relative paths) that exist under ``root``, with their contents' digests."""
    found = {}
    for relative in files:
        path = root / relative
        if path.is_file():
            found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def side_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if SIDE.match(p.name)]


@contextmanager
def workspace(root: Path) -> Iterator[Path]:
    """The user's folder with its files, a symbolic link, a data folder; the current folder inside it."""
    ws = root / "ws"
    for relative, text in USER_FILES.items():
        (ws / relative).parent.mkdir(parents=True, exist_ok=True)
        (ws / relative).write_text(text)
    (ws / "link").symlink_to(ws / "target")
    (ws / "emptytarget").mkdir()
    (ws / "emptylink").symlink_to(ws / "emptytarget")
    data = ws / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for k in range(6):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(data / f"{k}.png")
    before = os.getcwd()
    os.chdir(ws)
    try:
        with mock.patch("gn_convert.load.names.build_torchvision", lambda name, **kw: Tiny(**kw)):
            yield ws
    finally:
        os.chdir(before)


def path_of(value: object, ws: Path) -> str:
    return str(value).replace("ABS", str(ws / "abs"))


def save_into(folder: str) -> int:
    """``gn_convert.save`` of a converted stand-in into ``folder`` (the Python API's writes); its exit code."""
    import gn_convert
    from gn_convert.errors import GnConvertError

    model = Tiny().eval()
    plan = gn_convert.plan(model, 4)
    try:
        gn_convert.save(gn_convert.convert(model, plan=plan), folder, plan=plan, architecture="resnet18")
    except GnConvertError:
        return 2
    return 0


def argv(command: dict[str, object], ws: Path, outputs: list[str]) -> list[str]:
    def path(value: object) -> str:
        return path_of(value, ws)

    out = path(command["out"])
    force = ["--force"] if command["force"] else []
    if command["kind"] == "finetune":
        checkpoint = outputs[-1] if outputs else "missing-checkpoint"
        state = ["--state-dir", path(command["state"])] if command["state"] else []
        return ["finetune", checkpoint, "--data", "data", "--steps", "1", "--input-size", "16", "--batch-size", "4",
                "--holdout", "0.34", "--out", out, *force, *state]
    if command["kind"] == "deploy":
        onnx = f"{outputs[-1]}/model.onnx" if outputs else "missing.onnx"
        name = ["--name", str(command["name"])] if command["name"] else []
        return ["deploy", onnx, "--triton-repo", path(command["repo"] or "repo"), *name, *force]
    extra = [] if command["onnx"] or command["repo"] else ["--no-onnx"]
    repo = ["--triton-repo", path(command["repo"])] if command["repo"] else []
    name = ["--triton-name", str(command["name"])] if command["repo"] and command["name"] else []
    return ["resnet18", "--weights", "none", "--groups", "4", "--out", out, *force, *extra, *repo, *name]


@pytest.mark.slow
@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(commands=st.lists(COMMANDS, min_size=1, max_size=3))
def test_no_user_file_changes_or_disappears_and_nothing_is_left_beside(commands, tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("fs")
    with workspace(root) as ws:
        files = hashes(ws, dict(USER_FILES))  # relative path -> digest of what the user wrote
        assert len(files) == len(USER_FILES)
        assert main(["resnet18", "--weights", "none", "--groups", "4", "--out", "first"]) == 0  # an earlier output
        outputs = ["first"]
        for step, command in enumerate(commands):
            if command["kind"] == "save":
                args, code = ["save", path_of(command["out"], ws)], save_into(path_of(command["out"], ws))
            else:
                args = argv(command, ws, outputs)
                try:
                    code = main(args)
                except SystemExit as stop:  # argparse's own refusals
                    code = int(stop.code or 0)
            assert code in (0, 1, 2), args
            now = hashes(ws, files)
            assert now == files, (args, code, sorted(k for k in files if now.get(k) != files[k]))
            assert not side_files(root), (args, side_files(root))
            written = Path(path_of(command["out"], ws))
            if code == 0 and command["kind"] == "convert" and (command["onnx"] or command["repo"]):
                outputs.append(str(written))
            if code == 0 and command["add_file"] and command["kind"] != "deploy" and written.is_dir():
                added = (written / f"mine-{step}.txt").resolve().relative_to(ws.resolve()).as_posix()
                (ws / added).write_text(f"added after step {step}")  # a file the user puts into an output
                files.update(hashes(ws, {added: ""}))
