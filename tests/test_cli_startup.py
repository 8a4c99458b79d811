"""The command line starts without torch, onnx, torchvision or onnxruntime: ``--version``,
``--help`` and building the parser import none of them; the lazily read choices and the CLI's
copies of API defaults agree with the API's own maps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "onnx", "onnxruntime", "onnxscript")
PROBE = """
import sys
from gn_convert.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("HEAVY:" + ",".join(sorted(m for m in {heavy!r} if m in sys.modules)))
"""


def _heavy_after(argv: list[str]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY:"), done.stdout
    return [name for name in last[len("HEAVY:"):].split(",") if name]


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["-h"], []])
def test_version_and_help_import_no_heavy_module(argv: list[str]) -> None:
    assert _heavy_after(argv) == []


def test_building_the_parser_imports_no_heavy_module() -> None:
    code = ("import sys\nfrom gn_convert.cli import build_parser\nbuild_parser()\n"
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "", (done.stdout, done.stderr)


def test_console_script_version_names_the_package_version() -> None:
    import gn_convert

    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "gn_convert", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"gn-convert {gn_convert.__version__}"
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.product_defaults
def test_lazy_choices_and_cli_defaults_match_the_api_maps() -> None:
    from gn_convert.cli import arguments, build_parser, convert, deploy, serve
    from gn_convert.deploy.server import LOOPBACK
    from gn_convert.deploy.triton_repo import DEFAULT_SERVER_REPO, INSTANCE_KINDS
    from gn_convert.fidelity.calibrate.engine import ORDERS
    from gn_convert.fidelity.calibrate.moments import FITS
    from gn_convert.fidelity.distill.options import TRAINABLE
    from gn_convert.onnx.targets import DEFAULT_TARGET, TARGETS
    from gn_convert.pipeline import PARITY_BATCH
    from gn_convert.surgery.group_count import DEFAULT_MIN_CHANNELS
    from gn_convert.surgery.initialize import INITS
    from gn_convert.surgery.plan import FIDELITY, POLICIES

    assert list(arguments.POLICY_CHOICES) == list(POLICIES) and arguments.FIDELITY == FIDELITY in POLICIES
    assert arguments.DEFAULT_MIN_CHANNELS == DEFAULT_MIN_CHANNELS
    assert list(arguments.INIT_CHOICES) == list(INITS) and list(arguments.FIT_CHOICES) == list(FITS)
    assert list(arguments.ORDER_CHOICES) == list(ORDERS) and list(arguments.TRAINABLE_CHOICES) == list(TRAINABLE)
    assert list(arguments.TARGET_CHOICES) == list(TARGETS) and list(deploy.INSTANCE_CHOICES) == list(INSTANCE_KINDS)
    assert (convert.PARITY_BATCH, deploy.DEFAULT_SERVER_REPO, serve.LOOPBACK) == (PARITY_BATCH, DEFAULT_SERVER_REPO,
                                                                                  LOOPBACK)
    args = build_parser().parse_args(["convert", "resnet18"])
    assert (args.policy, args.init, args.calibrate_method, args.calibrate_order, args.trainable, args.onnx_target) \
        == (POLICIES[0], next(iter(INITS)), next(iter(FITS)), next(iter(ORDERS)), TRAINABLE[0], DEFAULT_TARGET)


def test_convert_help_groups_every_option_by_stage() -> None:
    import argparse

    from gn_convert.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["convert"]
    groups = {group.title: [action.dest for action in group._group_actions] for group in parser._action_groups}
    assert list(groups) == ["positional arguments", "options", "model and weights",
                            "group plan (which GroupNorm replaces each BatchNorm)",
                            "fidelity: data (for --recover, --calibrate and distillation)",
                            "fidelity: recovery (one budgeted call that brings the function back)",
                            "fidelity: calibration and distillation by step count", "differential privacy (Opacus)",
                            "ONNX export and parity", "deploy: Triton model repository", "output"]
    assert groups["positional arguments"] == [] and groups["options"] == ["help"]  # every option has its stage
    assert groups["model and weights"] == ["model", "weights", "num_classes", "weights_backbone"]
    assert groups["output"] == ["out", "force", "format"] and groups["differential privacy (Opacus)"] == ["dp_ready"]
    assert {"recover", "budget", "state_dir"} <= set(groups[next(t for t in groups if "recovery" in t)])
    assert parser.format_help().startswith("usage: gn-convert [convert] MODEL [options]\n")
    # --groups is a target: its help says what the default bound does and how to get G on every layer
    groups_help = " ".join(next(a for a in parser._actions if a.dest == "groups").help.split())
    assert "by default every layer keeps at least 16 channels per group" in groups_help
    assert "--min-channels-per-group 1 gives G on every layer" in groups_help


def test_mismatched_torch_and_torchvision_builds_are_one_line_and_exit_2(tmp_path) -> None:
    """A torchvision built for another torch fails at import with 'operator torchvision::nms does not exist';
    the command said 'internal error ... please report it' with exit 1."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "gn_convert", "list"], capture_output=True, text=True, env=env,
                          timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("gn-convert: error: torch ") and "are not built for each other" in lines[0]
    assert "reinstall both from the same index" in lines[0]
