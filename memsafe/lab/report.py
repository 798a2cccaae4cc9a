"""Tables and figures of a lab evaluation: a markdown table, the replication-vs-alignment trade-off plot and the
grid of images with the same seeds with and without mitigation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .runner import Lab, Run

REGIME_NAMES = {
    "cfg_driven": "memorized, CFG-driven",
    "point_mass": "memorized, point mass (hard)",
    "generic": "generic",
}


def _pct(value: float, spread: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = f"{100 * value:.0f}%"
    if spread is not None and not math.isnan(spread):
        text += f" ± {100 * spread:.0f}"
    return text


def _num(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _out_of_distribution(row: dict[str, Any]) -> str:
    """How often the noise-out-of-distribution warning fired, and (in brackets) on how many of the misaligned
    images; rows written before it existed have neither."""
    if "out_of_distribution" not in row:
        return "-"
    return f"{_pct(row['out_of_distribution'])} ({_pct(row.get('misaligned_out_of_distribution', math.nan))})"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per (method, regime): replication (± 95% confidence half-width over seeds), alignment, diversity,
    norms, how often the noise left the distribution, cost."""
    head = (
        "| method | prompts | images | replication (± 95% CI over seeds) | alignment (± 95% CI) | diversity | "
        "‖ε̃‖ before → after | noise out of distribution (of misaligned) | guidance evals fwd/bwd per image "
        "| s per image |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        if not r:
            continue
        lines.append(
            f"| {r['method']} | {REGIME_NAMES.get(r['regime'], r['regime'])} | {r['images']} "
            f"| {_pct(r['replication'], r['replication_ci95'])} "
            f"| {_pct(r['alignment'], r['alignment_ci95'])} | {_num(r['diversity'])} "
            f"| {r['norm_before']:.3f} → {r['norm_after']:.3f} "
            f"| {_out_of_distribution(r)} "
            f"| {r['forward_per_image']:.1f} / {r['backward_per_image']:.1f} | {r['seconds_per_image']:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def tradeoff_plot(sweeps: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> None:
    """Replication (y) against alignment (x) on the CFG-driven memorized prompts, one curve per method, points
    labelled with the swept value. ``sweeps`` maps a method family to its summary rows (with a ``sweep`` key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    markers = {
        "none": "*",
        "guidance_1": "X",
        "delayed_cfg": "s",
        "batch_wise": "o",
        "per_sample": "^",
        "per_sample_adamw": "v",
        "auto": "D",
    }
    for family, rows in sweeps.items():
        if not rows:
            continue
        xs = [r["alignment"] for r in rows]
        ys = [r["replication"] for r in rows]
        err = [r["replication_ci95"] for r in rows]
        label = {
            "none": "no mitigation (CFG 7)",
            "guidance_1": "guidance 1 (no CFG)",
            "delayed_cfg": "CFG delayed K steps (static transition)",
            "batch_wise": "batch-wise (Alg. 1)",
            "per_sample": "per-sample (Alg. 2, Polyak step: the default)",
            "per_sample_adamw": "per-sample (Alg. 2, AdamW: the paper)",
            "auto": "auto",
        }.get(family, family)
        colour = {
            "none": "C0",
            "guidance_1": "C1",
            "delayed_cfg": "C2",
            "batch_wise": "C3",
            "per_sample": "C4",
            "per_sample_adamw": "C6",
        }
        ax.errorbar(
            xs,
            ys,
            yerr=err,
            marker=markers.get(family, "o"),
            ms=7,
            capsize=2,
            label=label,
            lw=1,
            color=colour.get(family, "C5"),
        )
        for r, x, y in zip(rows, xs, ys, strict=True):
            if r.get("sweep"):
                ax.annotate(r["sweep"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("prompt alignment (colour and shape recognised)")
    ax.set_ylabel("replication rate (nearest training image ≥ threshold)")
    ax.set_title(title or "memsafe lab: CFG-driven memorized prompts (bars: 95% CI over seeds)", fontsize=9)
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _to_uint8(images: Tensor) -> Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(
    lab: Lab,
    runs: Sequence[Run],
    captions: Sequence[str],
    seeds: Sequence[int],
    path: str | Path,
) -> None:
    """A PNG: per caption, one row per run (same seeds in the columns), with the training copy in the first
    column; replicated images are framed in red. Runs must contain every (caption, seed) pair shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(captions) * len(runs)
    cols = len(seeds) + 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(0.72 * cols + 1.9, 0.72 * rows + 0.4), dpi=100, squeeze=False
    )
    for ci, caption in enumerate(captions):
        prompt = next(p for p in lab.prompts if p.caption == caption)
        for ri, run in enumerate(runs):
            row = ci * len(runs) + ri
            ax = axes[row][0]
            if ri == 0 and prompt.copy is not None:
                ax.imshow(_to_uint8(lab.train_images[prompt.copy]).permute(1, 2, 0).numpy())
                ax.set_title("training copy", fontsize=6)
            ax.set_axis_off()
            ax.text(
                -0.15,
                0.5,
                f"{caption}\n{run.method.label}" if ri == 0 else run.method.label,
                transform=ax.transAxes,
                ha="right",
                va="center",
                fontsize=6,
            )
            for si, seed in enumerate(seeds):
                ax = axes[row][si + 1]
                ax.set_xticks([])
                ax.set_yticks([])
                match = [
                    i
                    for i, (p, s) in enumerate(zip(run.prompts, run.seeds, strict=True))
                    if p.caption == caption and s == seed
                ]
                if not match:
                    ax.set_axis_off()
                    continue
                i = match[0]
                ax.imshow(_to_uint8(run.images[i]).permute(1, 2, 0).numpy())
                replicated = float(run.nn_sim[i]) >= lab.threshold
                for spine in ax.spines.values():
                    spine.set_edgecolor("red" if replicated else "0.8")
                    spine.set_linewidth(2.0 if replicated else 0.5)
                if row == 0:
                    ax.set_title(f"seed {seed}", fontsize=6)
    fig.suptitle("same seeds with and without memsafe (red frame: replicates a training image)", fontsize=8)
    fig.subplots_adjust(
        left=0.2, right=0.99, top=1 - 0.5 / (0.72 * rows + 0.4), bottom=0.01, wspace=0.08, hspace=0.12
    )
    fig.savefig(path)
    plt.close(fig)
