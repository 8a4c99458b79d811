"""Coverage sweep: convert, export and check every torchvision model that has BatchNorm, and timm's.

For each model of ``gn_convert.list_models()`` (untrained weights whose BatchNorm statistics
were made non-trivial on real photo crops): plan and convert with the default plan, export the
``function`` and ``inlined`` targets, and compare onnxruntime (CPU) with torch at batch 1 and 2
with :func:`gn_convert.check_parity`. Segmentation and detection models whose backbones use
BatchNorm or FrozenBatchNorm2d are converted and run eagerly, then exported where the exporter
supports them; what fails says why. The timm section (:data:`TIMM`, a few dozen BatchNorm models
of the resnet, efficientnet, mobilenet, regnet and cspnet families and others) runs the same
routine and also checks that every activation module survives the conversion (timm's norm layers
carry their activation).

Results go to ``models/catalog.json`` after every model (so a stopped sweep resumes where it
stopped: finished models are skipped unless ``--redo``), and ``models/CATALOG.md`` is written
from it at the end.

Usage::

    python scripts/sweep.py                       # everything (resumes)
    python scripts/sweep.py --models resnet18,mobilenet_v2 --redo
    python scripts/sweep.py --dense-only          # segmentation and detection only
    python scripts/sweep.py --timm-only           # the timm section only (needs the timm extra)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torchvision

import gn_convert
from gn_convert.testing.catalog import TIMM_CATALOG
from gn_convert.testing.sweep_row import classification_row, task_row

ROOT = Path(__file__).resolve().parent.parent
CATALOG = ROOT / "models" / "catalog.json"
DENSE = tuple(name for task in ("segmentation", "detection", "video") for name in gn_convert.list_models(task))
"""Every torchvision segmentation, detection and video model with BatchNorm."""
TIMM = TIMM_CATALOG
"""The timm section: BatchNorm classification models by family (untrained weights)."""
CAUSES: dict[str, str] = {}
"""Causes of known failures, measured by hand (printed in CATALOG.md beside the row)."""


def load_catalog() -> dict[str, dict[str, Any]]:
    """The rows recorded so far, by model name."""
    if CATALOG.exists():
        return {row["model"]: row for row in json.loads(CATALOG.read_text())["models"]}
    return {}


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_catalog(rows: dict[str, dict[str, Any]], wall_s: float) -> None:
    """Write catalog.json (every row) and CATALOG.md (the table)."""
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "gn_convert": gn_convert.__version__, "sweep_wall_s": round(wall_s, 1)}
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (rows[k]["kind"], k))]
    write_atomic(CATALOG, json.dumps({"meta": meta, "models": ordered}, indent=1))
    write_atomic(CATALOG.with_name("CATALOG.md"), render_markdown(ordered, meta))


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def render_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The catalog as a Markdown page."""
    torchvision_rows = [r for r in rows if r["kind"] != "timm"]
    dense = [r for r in torchvision_rows if r["kind"] in DENSE_KINDS]
    passed = sum(1 for r in torchvision_rows if r.get("passed"))
    lines = [
        "# Model catalog", "",
        "Written by `python scripts/sweep.py` (do not edit by hand). Untrained torchvision weights whose "
        "BatchNorm statistics were measured on real photo crops; default plan (G=32, divisor policy); "
        "onnxruntime CPU vs torch at batch 1 and 2 from one file, for the `function` and `inlined` targets. "
        "Inputs use the smallest side of 64/128/224/299 that the model accepts (for speed).", "",
        f"**{passed} of {len(torchvision_rows)} pass.** torch {meta['torch']}, torchvision {meta['torchvision']}, "
        f"gn-convert {meta['gn_convert']}; total wall time of the sweep runs that wrote this page "
        f"{meta['sweep_wall_s']} s on 2 shared CPU cores.", "", *family_table(rows), "",
        "| model | input | BN layers | fallbacks | left BN | params (M) | convert s | export s (fn) "
        "| max abs (fn) | max rel (fn) | max rel (inl) | pass |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r["kind"] != "classification":
            continue
        verdict = "yes" if r.get("passed") else "**no** (see notes)"
        lines.append(
            f"| {r['model']} | {r.get('input_size', '-')} | {r.get('bn_layers', '-')} | {r.get('fallbacks', '-')} "
            f"| {r.get('left_as_bn', '-')} | {_num(r.get('params_m'), '.1f')} | {_num(r.get('convert_s'), '.2f')} "
            f"| {_num(r.get('function_export_s'), '.1f')} | {_num(r.get('function_max_abs'), '.1e')} "
            f"| {_num(r.get('function_max_rel'), '.1e')} | {_num(r.get('inlined_max_rel'), '.1e')} | {verdict} |")
    lines += dense_section(dense)
    lines += timm_section([r for r in rows if r["kind"] == "timm"])
    notes = [f"- {r['model']}: {r['export']}" for r in rows if r.get("export")]
    for r in rows:
        if not r.get("passed"):
            shown = (r.get("function_failures") or r.get("inlined_failures") or [r.get("error", "")])[:2]
            notes.append(f"- {r['model']} fails: {'; '.join(shown)}" + (f". Cause: {CAUSES[r['model']]}"
                                                                        if r["model"] in CAUSES else ""))
    if notes:
        lines += ["", "Notes:", "", *notes]
    return "\n".join(lines) + "\n"


DENSE_KINDS = ("segmentation", "detection", "video")


def family_table(rows: list[dict[str, Any]]) -> list[str]:
    """Pass/fail per task: the table the README shows."""
    lines = ["| task | models | pass |", "| --- | --- | --- |"]
    for kind in ("classification", *DENSE_KINDS, "timm"):
        group = [r for r in rows if r["kind"] == kind]
        if group:
            lines.append(f"| {kind} | {len(group)} | {sum(1 for r in group if r.get('passed'))} |")
    return lines


def dense_section(rows: list[dict[str, Any]]) -> list[str]:
    """Segmentation, detection and video models: exported and checked the way the main command does."""
    if not rows:
        return []
    lines = ["", "## Segmentation, detection and video", "",
             "Each exported and checked by its task (`gn_convert/tasks`): segmentation's `out`/`aux` logits per "
             "pixel, video clips of 16 frames, detection through torchvision's ONNX path with every GroupNorm layer "
             "compared on pictures and the detections matched by IoU (docs/PARITY.md).", "",
             "| model | task | input | BN kinds | BN layers | custom nodes | BN nodes | params (M) | export s "
             "| parity s | worst max rel | pass |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["kind"], r["model"])):
        verdict = "yes" if r.get("passed") else "**no** (see notes)"
        lines.append(f"| {r['model']} | {r['kind']} | {r.get('input_size', '-')} | {', '.join(r.get('bn_kinds', []))} "
                     f"| {r.get('bn_layers', '-')} | {r.get('custom_nodes', '-')} | {r.get('batchnorm_nodes', '-')} "
                     f"| {_num(r.get('params_m'), '.1f')} | {_num(r.get('function_export_s'), '.1f')} "
                     f"| {_num(r.get('parity_s'), '.1f')} | {_num(r.get('function_max_rel'), '.1e')} | {verdict} |")
    return lines


def timm_section(rows: list[dict[str, Any]]) -> list[str]:
    """The timm models' table: the same columns plus the activation modules before -> after."""
    if not rows:
        return []
    passed = sum(1 for r in rows if r.get("passed"))
    lines = ["", "## timm models", "",
             f"**{passed} of {len(rows)} pass.** timm's norm layers that apply an activation (`BatchNormAct2d`) "
             "become `GroupNormAct` with the same activation: the activation modules must be as many after "
             "conversion as before.", "",
             "| model | input | BN layers | fallbacks | activations before -> after | params (M) | export s (fn) "
             "| max rel (fn) | max rel (inl) | pass |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        acts = r.get("activations") or ["-", "-"]
        verdict = "yes" if r.get("passed") else "**no** (see notes)"
        lines.append(f"| {r['model']} | {r.get('input_size', '-')} | {r.get('bn_layers', '-')} "
                     f"| {r.get('fallbacks', '-')} | {acts[0]} -> {acts[1]} | {_num(r.get('params_m'), '.1f')} "
                     f"| {_num(r.get('function_export_s'), '.1f')} | {_num(r.get('function_max_rel'), '.1e')} "
                     f"| {_num(r.get('inlined_max_rel'), '.1e')} | {verdict} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the sweep; returns 0 when every swept model passed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated subset (default: every model with BatchNorm)")
    parser.add_argument("--redo", action="store_true", help="sweep models already in the catalog again")
    parser.add_argument("--dense-only", action="store_true", help="only segmentation, detection and video models")
    parser.add_argument("--classification-only", action="store_true", help="skip segmentation, detection and video")
    parser.add_argument("--timm-only", action="store_true", help="only the timm section")
    parser.add_argument("--no-timm", action="store_true", help="skip the timm section")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [*([] if args.dense_only or args.timm_only else gn_convert.list_models("classification")),
             *([] if args.classification_only or args.timm_only else DENSE),
             *([] if args.dense_only or args.no_timm else TIMM)]
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f"sweep: unknown model(s) {', '.join(unknown)}", file=sys.stderr)
            return 2
        names = wanted
    rows = load_catalog()
    earlier = float(json.loads(CATALOG.read_text())["meta"]["sweep_wall_s"]) if CATALOG.exists() else 0.0
    start = time.perf_counter() - earlier  # the wall time of every run that wrote this catalog
    todo = [n for n in names if args.redo or n not in rows]
    with tempfile.TemporaryDirectory(prefix="gn-sweep-") as tmp:
        for k, name in enumerate(todo, 1):
            t0 = time.perf_counter()
            try:
                rows[name] = (task_row if name in DENSE else classification_row)(name, Path(tmp))
            except Exception as err:  # noqa: BLE001 - record and go on
                kind = gn_convert.tasks.task_of(name).name if name in DENSE else "timm" if name in TIMM else "classification"
                rows[name] = {"model": name, "kind": kind,
                              "passed": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
                traceback.print_exc(limit=2)
            save_catalog(rows, time.perf_counter() - start)
            verdict = "pass" if rows[name].get("passed") else f"FAIL {rows[name].get('error', '')}"
            print(f"[{k}/{len(todo)}] {name}: {verdict} ({time.perf_counter() - t0:.0f} s)", flush=True)
    save_catalog(rows, time.perf_counter() - start)
    failed = [n for n in names if not rows[n].get("passed")]
    print(f"{len(names) - len(failed)} of {len(names)} passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
