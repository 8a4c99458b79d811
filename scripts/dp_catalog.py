"""DP-ready over the whole catalog: every torchvision classification model with BatchNorm and timm's section.

For each model (untrained weights, converted at G=8): ``make_dp_ready`` on a copy, then outputs
(training and evaluation mode) and every parameter's gradient compared with the converted model,
and one Opacus DP-SGD step (:func:`gn_convert.testing.dp_row.dp_row`). A model is either exact
(outputs and gradients equal) and trains, or is refused by name.

Results go to ``models/dp_catalog.json`` after every model (a stopped run resumes; ``--redo`` runs
finished models again) and ``models/DP_CATALOG.md`` is written from it.

Usage::

    python scripts/dp_catalog.py                       # everything (resumes)
    python scripts/dp_catalog.py --models resnet18,timm/resnet18 --redo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

import gn_convert
from gn_convert.testing.catalog import catalog_names
from gn_convert.testing.dp_row import dp_row

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "models" / "dp_catalog.json"
PAGE = ROOT / "models" / "DP_CATALOG.md"
TOO_BIG = ("regnet_y_128gf",)
"""Models measured to need more memory than the 24 GB machine the catalog was run on (RSS over 20 GB)."""


def verdict(row: dict[str, Any]) -> str:
    """``exact, trains``, ``refused``, or what failed."""
    if "refused" in row:
        return "refused"
    if row.get("outputs", 1) != 0.0 or row.get("gradients", 1) != 0.0:
        return "**differs**"
    if "error" in row or not row.get("dp_step_change", 0) > 0:
        return "**DP step failed**"
    return "exact, trains"


def write_page(rows: dict[str, dict[str, Any]]) -> None:
    """Write models/DP_CATALOG.md from the results."""
    exact = sum(verdict(r) == "exact, trains" for r in rows.values())
    missing = [name for name in catalog_names() if name not in rows]
    lines = [
        "# DP-ready catalog", "",
        "Written by `python scripts/dp_catalog.py` (do not edit by hand). Each model (untrained weights, converted "
        "at G=8) is made DP-ready on a copy; its outputs in training and evaluation mode and every parameter's "
        "gradient are compared with the converted model's (largest relative difference), and one Opacus DP-SGD "
        "step (PrivacyEngine, hooks mode, batch 2) runs on it.", "",
        f"**{exact} of {len(rows)} are exact and train**"
        f"{f' ({len(missing)} of the catalog not run: see the notes)' if missing else ''}. torch {torch.__version__}, gn-convert "
        f"{gn_convert.__version__}, Python {platform.python_version()}.", "",
        "| model | input | params (M) | outputs | gradients | forwards rewritten | DP step: largest change | "
        "seconds | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in sorted(rows.items()):
        rewrites = ", ".join(row.get("rewrites", [])) or "none"
        lines.append(f"| {name} | {row.get('input_size', '')} | {row.get('params_m', '')} | {row.get('outputs', '')} | "
                     f"{row.get('gradients', '')} | {rewrites} | {row.get('dp_step_change', '')} | "
                     f"{row.get('seconds', '')} | {verdict(row)} |")
    notes = [f"- {name}: {row.get('refused') or row.get('error')}" for name, row in sorted(rows.items())
             if verdict(row) != "exact, trains"]
    notes += [f"- {name}: not run; its DP step at batch 2 passed 20 GB of memory on this 24 GB machine and was stopped"
              if name in TOO_BIG else f"- {name}: not run yet" for name in missing]
    if notes:
        lines += ["", "## Notes", "", *notes]
    PAGE.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names (default: the whole catalog)")
    parser.add_argument("--redo", action="store_true", help="run models that already have a result again")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("GN_THREADS", "2")))
    names = args.models.split(",") if args.models else catalog_names()
    rows: dict[str, dict[str, Any]] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in names:
        if name in rows and not args.redo or name in TOO_BIG and not args.models:
            continue
        try:
            rows[name] = dp_row(name)
        except Exception as err:  # noqa: BLE001 - one model's failure is its row
            rows[name] = {"model": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        print(f"{name:32s} {verdict(rows[name]):20s} {rows[name].get('seconds', '')} s", flush=True)
        RESULTS.write_text(json.dumps(rows, indent=1, sort_keys=True))
    write_page(rows)
    print(f"{sum(verdict(r) == 'exact, trains' for r in rows.values())} of {len(rows)} exact and training; "
          f"see {PAGE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
