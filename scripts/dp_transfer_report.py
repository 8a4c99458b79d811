"""Reporting for the DP transfer study (``scripts/dp_transfer.py``): markdown tables, JSON, the figure."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gn_convert.atomic import atomic_file

STARTS: dict[str, str] = {"fix": "(a) Opacus fix", "fold": "(b) BN folded", "convert": "(c) gn-convert",
                          "recover": "(d) gn-convert + recover"}


def table(summary: Sequence[dict[str, Any]]) -> str:
    """The long markdown table: one row per network, start and epsilon."""
    lines = ["| network | start | ε | accuracy % (mean ± std) | per seed | σ | s/run |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for r in sorted(summary, key=lambda r: (r["network"], r["epsilon"], list(STARTS).index(r["start"]))):
        seeds = ", ".join(f"{v:.1f}" for v in r["per_seed"])
        lines.append(f"| {r['network']} | {STARTS[r['start']]} | {r['epsilon']:g} | {r['accuracy_mean']:.1f} ± "
                     f"{r['accuracy_std']:.1f} | {seeds} | {r['noise_multiplier']:.2f} | {r['seconds_mean']:.1f} |")
    return "\n".join(lines).replace("| inf |", "| ∞ |")


def pivot(summary: Sequence[dict[str, Any]]) -> str:
    """The compact markdown table: one row per network and start, one column per epsilon."""
    epsilons = sorted({r["epsilon"] for r in summary})
    head = " | ".join(("∞" if math.isinf(e) else f"ε = {e:g}") for e in epsilons)
    lines = [f"| network | start | {head} |", "| --- | --- |" + " ---: |" * len(epsilons)]
    for network in dict.fromkeys(r["network"] for r in summary):
        for start in STARTS:
            cells = {r["epsilon"]: f"{r['accuracy_mean']:.1f} ± {r['accuracy_std']:.1f}" for r in summary
                     if (r["network"], r["start"]) == (network, start)}
            if cells:
                lines.append(f"| {network} | {STARTS[start]} | " + " | ".join(cells.get(e, "") for e in epsilons) + " |")
    return "\n".join(lines)


def write_json(study: Any, path: Path) -> None:
    """The configuration, per-network notes, every run and the summary (infinity written as null)."""
    def clean(value: Any) -> Any:
        if isinstance(value, float) and math.isinf(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    document = {"config": asdict(study.config), "networks": study.networks, "cpu_seconds": study.cpu_seconds,
                "summary": study.summary, "runs": [asdict(r) for r in study.runs]}
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(clean(document), indent=1) + "\n")


def plot(study: Any, path: Path) -> None:
    """Accuracy against epsilon, one line per starting point, one panel per network (error bars: std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    networks = list(study.networks)
    fig, axes = plt.subplots(1, len(networks), figsize=(5.5 * len(networks), 4.2), squeeze=False)
    epsilons = sorted({r["epsilon"] for r in study.summary})
    for ax, network in zip(axes[0], networks):
        for start, label in STARTS.items():
            rows = sorted((r for r in study.summary if (r["network"], r["start"]) == (network, start)),
                          key=lambda r: r["epsilon"])
            xs = [epsilons.index(r["epsilon"]) for r in rows]
            ax.errorbar(xs, [r["accuracy_mean"] for r in rows], yerr=[r["accuracy_std"] for r in rows], marker="o",
                        capsize=3, label=label)
        ax.axhline(study.networks[network]["chance"], color="grey", linestyle=":", label="chance")
        ax.set_xticks(range(len(epsilons)), ["∞\n(no noise)" if math.isinf(e) else f"{e:g}" for e in epsilons])
        ax.set_xlabel("ε (δ = 1e-5)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"{network}: {study.networks[network]['task'].split(':')[0]}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"DP-SGD fine-tuning from a BatchNorm network, mean ± std of {len(study.config.seeds)} seeds",
                 fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
