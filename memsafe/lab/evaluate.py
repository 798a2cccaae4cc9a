"""The full lab evaluation: memorized (CFG-driven and point-mass) and generic prompts x several seeds, for no
mitigation, CFG delayed by K steps (the static transition point baseline), batch-wise, per-sample and auto, plus
parameter sweeps for the trade-off plot.

    python -m memsafe.lab.evaluate                 # writes bench/results/lab.md, lab.json, lab_tradeoff.png, lab_grid.png

Everything goes through memsafe's public API (``guidance_from_eps_model``, ``adjust_noise``, ``risk_score``,
``uncond_only``), as a user's code would.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..methods import noise_rms_limit
from .data import COLOUR_NAMES, IMAGE_SIZE, SHAPES, random_images
from .metrics import nearest
from .report import REGIME_NAMES, image_grid, markdown_table, tradeoff_plot
from .runner import (
    GUIDANCE_SCALE,
    LAB_PRESET,
    Lab,
    Method,
    Prompt,
    Run,
    generate,
    lab_config,
    paired_difference,
    pairs_for,
    summarize,
)
from .train import machine

RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"


def main_methods() -> list[Method]:
    """The methods of the main table, with the lab preset: per-sample with its default step (Polyak) and with
    the paper's AdamW."""
    k = int(LAB_PRESET["uncond_steps"])
    return [
        Method("no mitigation", "none"),
        Method(f"CFG delayed {k} steps", "delayed_cfg", delay=k, sweep=f"K={k}"),
        Method("batch-wise", "batch_wise", lab_config("batch_wise")),
        Method("per-sample", "per_sample", lab_config("per_sample")),
        Method("per-sample AdamW (paper)", "per_sample_adamw", lab_config("per_sample", optimizer="adamw")),
        Method("auto", "auto", lab_config("auto")),
    ]


def regime_methods(delays: Sequence[int] = (3, 5, 10, 15, 20, 30)) -> list[Method]:
    """What separates the two memorized regimes: guidance 1 and CFG delayed by K steps, without any adjustment."""
    return [Method("guidance 1", "guidance_1", scale=1.0)] + [
        Method(f"CFG delayed {k} steps", "delayed_cfg", delay=k, sweep=f"K={k}") for k in delays
    ]


def sweep_methods() -> dict[str, list[Method]]:
    """Parameter sweeps of each method for the trade-off plot (on the CFG-driven prompts)."""
    return {
        "batch_wise": [
            Method(
                f"batch-wise gamma={g:g}",
                "batch_wise",
                lab_config("batch_wise", gamma=g),
                sweep=f"gamma={g:g}",
            )
            for g in (0.7, 1.5, 3.0, 6.0, 10.0)
        ],
        **{
            family: [
                Method(f"{label} target={t:g}", "per_sample", lab_config("per_sample", target=t, **step),
                       sweep=f"target={t:g}")
                for t in (0.55, 0.45, 0.4, 0.35, 0.3)
            ]
            for family, label, step in (("per_sample", "per-sample", {}),
                                        ("per_sample_adamw", "per-sample AdamW", {"optimizer": "adamw"}))
        },
    }


# The per-sample variants of bench/perf.py (issue: per-sample strength at batch-wise cost), same names there: the
# paper-exact method (AdamW on autograd gradients, one image at a time) against the faster ones, same target.
FD_RADIUS = 0.2  # the SD default 1.0 scaled to the lab's 768 elements (sqrt(768 / 16384) = 0.22)
POLYAK_MAX_STEPS = (0.01, 0.03, 0.1)  # around the default 0.05: what the cap on Polyak's step buys and costs
HELD_NORM = {"max_step": 0.1, "hold_norm_steps": 2}  # the held-norm variant's step (README, "Held norm")


def variant_methods() -> list[Method]:
    """Per-sample variants, all with the lab preset's target: their efficacy next to their cost."""
    return [
        Method("per_sample_exact", "per_sample", lab_config("per_sample", optimizer="adamw"), max_batch=1),
        Method("per_sample", "per_sample", lab_config("per_sample", optimizer="adamw")),
        Method(
            "per_sample_fd",
            "per_sample",
            lab_config("per_sample", gradient="finite_difference", fd_radius=FD_RADIUS, optimizer="adamw"),
        ),
        Method(
            "per_sample_fd_polyak",
            "per_sample",
            lab_config("per_sample", gradient="finite_difference", fd_radius=FD_RADIUS, optimizer="polyak"),
        ),
        Method("per_sample_polyak", "per_sample", lab_config("per_sample", optimizer="polyak")),
        *[
            Method(f"per_sample_polyak max_step={s:g}", "per_sample",
                   lab_config("per_sample", optimizer="polyak", max_step=s), sweep=f"max_step={s:g}")
            for s in POLYAK_MAX_STEPS
        ],
        Method("per_sample_polyak_step0.1_hold2", "per_sample", lab_config("per_sample", optimizer="polyak",
                                                                            **HELD_NORM)),
    ]


class Progress:
    """Progress lines on stderr: which stage, how many images done, elapsed time."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.start = time.time()
        self.label = ""

    def stage(self, label: str) -> None:
        self.label = label
        if not self.quiet:
            sys.stderr.write(f"\n[{self.elapsed()}] {label}")
            sys.stderr.flush()

    def __call__(self, done: int, total: int) -> None:
        if not self.quiet:
            sys.stderr.write(f"\r[{self.elapsed()}] {self.label}: {done}/{total} images")
            sys.stderr.flush()

    def adjusting(self, info: Any) -> None:
        """Progress of memsafe.adjust_noise (a memsafe.ProgressInfo)."""
        if not self.quiet:
            sys.stderr.write(
                f"\r[{self.elapsed()}] {self.label}: adjusting the noise, {info.method} iteration "
                f"{info.iteration}/{info.max_iterations}, {info.active} images active   "
            )
            sys.stderr.flush()

    def elapsed(self) -> str:
        s = int(time.time() - self.start)
        return f"{s // 60:2d}:{s % 60:02d}"

    def done(self) -> None:
        if not self.quiet:
            sys.stderr.write("\n")


def fresh_similarity(lab: Lab, n: int = 1000, seed: int = 12345) -> torch.Tensor:
    """Nearest-training-image similarity of ``n`` fresh draws from the data distribution (images that are new by
    construction): what "similar but not a copy" looks like, to set the replication threshold above it."""
    gen = torch.Generator().manual_seed(seed)
    colour = torch.randint(len(COLOUR_NAMES), (n,), generator=gen)
    shape = torch.randint(len(SHAPES), (n,), generator=gen)
    sim, _ = nearest(random_images(shape, colour, gen), lab.train_images)
    return sim


def histogram(values: torch.Tensor, low: float = 0.0, high: float = 1.0, bins: int = 50) -> dict[str, Any]:
    """Counts of ``values`` in ``bins`` equal bins over [low, high] (values below go to the first bin)."""
    counts = torch.histc(values.clamp(low, high).float(), bins=bins, min=low, max=high)
    return {"low": low, "high": high, "counts": [int(c) for c in counts]}


def quantiles(values: torch.Tensor) -> dict[str, float]:
    v = values.double()
    return {
        "min": float(v.min()),
        "p01": float(v.quantile(0.01)),
        "p50": float(v.quantile(0.5)),
        "p99": float(v.quantile(0.99)),
        "max": float(v.max()),
    }


def evaluate(
    lab: Lab,
    memorized_seeds: Sequence[int],
    generic_seeds: Sequence[int],
    *,
    sweeps: bool = True,
    regimes: bool = True,
    variants: bool = True,
    sweep_seeds: Sequence[int] | None = None,
    progress: Progress | None = None,
    grid_seeds: int = 6,
) -> tuple[dict[str, Any], dict[str, Run]]:
    """Run the evaluation; returns the JSON-ready results and the runs of the main table (for the grid)."""
    progress = progress or Progress(quiet=True)
    cfg_driven, point_mass, generic = (
        lab.regime("cfg_driven"),
        lab.regime("point_mass"),
        lab.regime("generic"),
    )
    all_pairs = (
        pairs_for(cfg_driven, memorized_seeds)
        + pairs_for(point_mass, memorized_seeds)
        + pairs_for(generic, generic_seeds)
    )
    results: dict[str, Any] = {"main": [], "regime": [], "sweeps": {}}
    main_runs: dict[str, Run] = {}
    for m in main_methods():
        progress.stage(f"{m.label} ({len(all_pairs)} images)")
        run = generate(lab, m, all_pairs, progress, progress.adjusting)
        main_runs[m.family] = run
        for regime in ("cfg_driven", "point_mass", "generic"):
            results["main"].append(summarize(lab, run, regime))
    # the default step against the paper's, image by image (the evidence for the default: README, "Default")
    results["paired"] = [paired_difference(lab, main_runs["per_sample"], main_runs["per_sample_adamw"], regime)
                         for regime in ("cfg_driven", "point_mass", "generic")]
    none = main_runs["none"]
    mem_pairs = pairs_for(cfg_driven, memorized_seeds) + pairs_for(point_mass, memorized_seeds)
    regime_rows = [r for r in results["main"] if r["method"] == "no mitigation" and r["regime"] != "generic"]
    if regimes:
        for m in regime_methods():
            if m.delay == LAB_PRESET["uncond_steps"]:
                run = main_runs["delayed_cfg"]
            else:
                progress.stage(f"regime check: {m.label} ({len(mem_pairs)} images)")
                run = generate(lab, m, mem_pairs, progress)
            for regime in ("cfg_driven", "point_mass"):
                row = summarize(lab, run, regime)
                row["sweep"] = m.sweep
                regime_rows.append(row)
    results["regime"] = regime_rows
    if sweeps:
        sweep_pairs = pairs_for(cfg_driven, sweep_seeds if sweep_seeds is not None else memorized_seeds)
        curves: dict[str, list[dict[str, Any]]] = {
            "none": [summarize(lab, none, "cfg_driven")],
            "guidance_1": [
                r for r in regime_rows if r["method"] == "guidance 1" and r["regime"] == "cfg_driven"
            ],
            "delayed_cfg": [
                dict(summarize(lab, none, "cfg_driven"), sweep="K=0"),
                *[
                    r
                    for r in regime_rows
                    if r["method"].startswith("CFG delayed") and r["regime"] == "cfg_driven"
                ],
            ],
        }
        for family, methods in sweep_methods().items():
            curves[family] = []
            for m in methods:
                progress.stage(f"sweep: {m.label} ({len(sweep_pairs)} images)")
                run = generate(lab, m, sweep_pairs, progress, progress.adjusting)
                row = summarize(lab, run, "cfg_driven")
                row["sweep"] = m.sweep
                curves[family].append(row)
        results["sweeps"] = curves
    if variants:
        variant_pairs = pairs_for(cfg_driven, memorized_seeds)
        results["variants"] = []
        for m in variant_methods():
            progress.stage(f"per-sample variant: {m.label} ({len(variant_pairs)} images)")
            run = generate(lab, m, variant_pairs, progress, progress.adjusting)
            results["variants"].append(summarize(lab, run, "cfg_driven"))
    progress.stage("replication threshold: fresh draws from the data distribution against the training set")
    fresh = fresh_similarity(lab)
    results["similarity"] = {
        "definition": "Pearson correlation of the high-pass images (image minus its 5x5 local mean), per channel, "
        "averaged over RGB (1: identical)",
        "threshold": lab.threshold,
        "fresh_draws_vs_training": quantiles(fresh),
        "fresh_draws_at_or_above_threshold": float((fresh >= lab.threshold).float().mean()),
        "fresh_draws_histogram": histogram(fresh),
        "generated_no_mitigation": {
            regime: {
                "quantiles": quantiles(
                    none.nn_sim[[i for i, p in enumerate(none.prompts) if p.regime == regime]]
                ),
                "histogram": histogram(
                    none.nn_sim[[i for i, p in enumerate(none.prompts) if p.regime == regime]]
                ),
            }
            for regime in ("cfg_driven", "point_mass", "generic")
        },
        "own_copy_no_mitigation": {
            regime: {
                "quantiles": quantiles(
                    none.own_sim[[i for i, p in enumerate(none.prompts) if p.regime == regime]]
                ),
                "histogram": histogram(
                    none.own_sim[[i for i, p in enumerate(none.prompts) if p.regime == regime]], -0.2, 1.0, 60
                ),
            }
            for regime in ("cfg_driven", "point_mass")
        },
    }
    progress.done()
    return results, main_runs


def grid_captions(lab: Lab) -> list[str]:
    """Captions shown in the grid: two CFG-driven prompts, one point-mass and one generic prompt."""
    cfg = lab.regime("cfg_driven")
    return [
        cfg[0].caption,
        cfg[4].caption,
        lab.regime("point_mass")[0].caption,
        lab.regime("generic")[0].caption,
    ]


def write_outputs(
    lab: Lab,
    results: dict[str, Any],
    runs: dict[str, Run],
    out: Path,
    seeds: Sequence[int],
    command: str,
    seconds: float,
    prefix: str = "lab",
) -> str:
    """Write ``<prefix>.json``, ``<prefix>.md``, ``<prefix>_tradeoff.png``, ``<prefix>_grid.png`` (and its small
    version for the README, ``<prefix>_grid_small.png``) into ``out``; returns the markdown table of the main
    results."""
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    results["command"] = command
    results["seconds"] = round(seconds, 1)
    results["machine"] = machine()
    results["settings"] = {
        "sampler": f"DDIM eta=0, {lab.steps} steps, trailing timesteps from 999, CFG {GUIDANCE_SCALE}",
        "lab_preset": LAB_PRESET,
        "replication_threshold": lab.threshold,
        "methods": [m.describe() for m in main_methods()],
    }
    (out / f"{prefix}.json").write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    table = markdown_table(results["main"])
    curves = results.get("sweeps") or {
        "none": [
            r for r in results["main"] if r["method"] == "no mitigation" and r["regime"] == "cfg_driven"
        ],
        **{
            fam: [r for r in results["main"] if r["method"] == label and r["regime"] == "cfg_driven"]
            for fam, label in (
                ("delayed_cfg", main_methods()[1].label),
                ("batch_wise", "batch-wise"),
                ("per_sample", "per-sample"),
                ("per_sample_adamw", next(m.label for m in main_methods() if m.family == "per_sample_adamw")),
                ("auto", "auto"),
            )
        },
    }
    tradeoff_plot(curves, out / f"{prefix}_tradeoff.png")
    order = ["none", "delayed_cfg", "batch_wise", "per_sample", "auto"]
    shown = [runs[k] for k in order if k in runs]
    image_grid(lab, shown, grid_captions(lab), seeds, out / f"{prefix}_grid.png")
    # the README's small version: one CFG-driven prompt, four seeds
    image_grid(lab, shown, grid_captions(lab)[:1], seeds[:4], out / f"{prefix}_grid_small.png")
    (out / f"{prefix}.md").write_text(lab_markdown(results, prefix))
    return table


def lab_markdown(results: dict[str, Any], prefix: str = "lab") -> str:
    """The text of ``<prefix>.md`` from the JSON-ready results."""
    command, seconds, table = results["command"], results["seconds"], markdown_table(results["main"])
    md = [
        f"# memsafe lab results ({prefix})",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min)",
        "",
        table,
        "Noise out of distribution: the images whose adjusted noise memsafe warns of (its RMS outside "
        f"{1 / noise_rms_limit(3 * IMAGE_SIZE**2):.3f}-{noise_rms_limit(3 * IMAGE_SIZE**2):.3f}, "
        "`memsafe.noise_rms_limit`; Gaussian noise has 1), in brackets their share among the misaligned images.",
    ]
    if results.get("paired"):
        md += ["", "## Per-sample's default step (Polyak) against the paper's AdamW, image by image", "",
               "Same prompts, seeds and target; the difference (default minus AdamW) in points, ± the 95% "
               "half-width over seeds.", "", "| prompts | images | replication | alignment |", "|---|---|---|---|"]
        md += [f"| {REGIME_NAMES[r['regime']]} | {r['images']} | {_points(r, 'replication')} | "
               f"{_points(r, 'alignment')} |" for r in results["paired"]]
    if results.get("regime"):
        md += ["", "## Regimes: replication without noise adjustment", "", markdown_table(results["regime"])]
    if results.get("sweeps"):
        sweep_rows = [
            dict(r, method=f"{fam}: {r.get('sweep') or r['method']}")
            for fam, rows in results["sweeps"].items()
            for r in rows
        ]
        md += ["", "## Sweeps on the CFG-driven prompts (the trade-off plot)", "", markdown_table(sweep_rows)]
    sim = results.get("similarity")
    if sim:
        md += [
            "",
            "## Replication threshold",
            "",
            f"Similarity: {sim['definition']}. Threshold {sim['threshold']}: "
            f"{100 * sim['fresh_draws_at_or_above_threshold']:.1f}% of fresh draws from the data distribution (new "
            "images, similar to a training image by chance) reach it. Nearest-training-image similarity:",
            "",
            "| images | min | p01 | p50 | p99 | max |",
            "|---|---|---|---|---|---|",
        ]
        groups = [
            ("fresh draws from the data distribution (new by construction)", sim["fresh_draws_vs_training"])
        ]
        groups += [
            (f"generated without mitigation: {REGIME_NAMES[k]}", v["quantiles"])
            for k, v in sim["generated_no_mitigation"].items()
        ]
        for name, q in groups:
            md.append(
                f"| {name} | " + " | ".join(f"{q[k]:.3f}" for k in ("min", "p01", "p50", "p99", "max")) + " |"
            )
    if results.get("variants"):
        md += ["", "## Per-sample variants (same target): paper-exact against the faster ones", ""]
        if results.get("variants_command"):
            md += [f"Re-run on their own: `{results['variants_command']}` ({results['variants_seconds'] / 60:.1f} min)",
                   ""]
        md.append(markdown_table(results["variants"]))
    return "\n".join(md) + "\n"


def _points(row: dict[str, Any], name: str) -> str:
    return f"{100 * row[name + '_difference']:+.1f} ± {100 * row[name + '_difference_ci95']:.1f}"


def rerun_variants(lab: Lab, seeds: Sequence[int], out: Path, prefix: str, command: str,
                   progress: Progress | None = None) -> list[dict[str, Any]]:
    """Run only the per-sample variants and put their rows into an existing ``<prefix>.json`` and ``.md`` (the
    rest of the evaluation, 45 min, is left as it was)."""
    path = out / f"{prefix}.json"
    if not path.exists():
        raise SystemExit(f"memsafe lab: {path} does not exist; run the full evaluation first")
    progress = progress or Progress(quiet=True)
    start = time.time()
    pairs = pairs_for(lab.regime("cfg_driven"), seeds)
    rows = []
    for m in variant_methods():
        progress.stage(f"per-sample variant: {m.label} ({len(pairs)} images)")
        rows.append(summarize(lab, generate(lab, m, pairs, progress, progress.adjusting), "cfg_driven"))
    results = json.loads(path.read_text())
    results.update(variants=rows, variants_command=command, variants_seconds=round(time.time() - start, 1))
    path.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    (out / f"{prefix}.md").write_text(lab_markdown(results, prefix))
    return rows


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return str(obj)


def main(argv: list[str] | None = None) -> None:
    """Command line of the full evaluation."""
    ap = argparse.ArgumentParser(prog="python -m memsafe.lab.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=16, help="seeds per memorized prompt")
    ap.add_argument("--generic-seeds", type=int, default=4, help="seeds per generic prompt")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--prefix", default="lab")
    ap.add_argument("--sweep-seeds", type=int, default=8, help="seeds per prompt in the parameter sweeps")
    ap.add_argument("--no-sweeps", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants-only", action="store_true",
                    help="re-run only the per-sample variants into an existing <prefix>.json/.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    lab = Lab.load()
    seeds = list(range(args.seeds))
    command = "python -m memsafe.lab.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.variants_only:
        rows = rerun_variants(lab, seeds, args.out, args.prefix, command.strip(), Progress())
        print(markdown_table(rows))
        print(f"memsafe lab: updated the variants in {args.out}/{args.prefix}.md and .json")
        return
    results, runs = evaluate(
        lab,
        seeds,
        list(range(args.generic_seeds)),
        sweeps=not args.no_sweeps,
        sweep_seeds=list(range(args.sweep_seeds)),
        progress=Progress(),
    )
    table = write_outputs(
        lab, results, runs, args.out, seeds[:6], command.strip(), time.time() - start, args.prefix
    )
    print(table)
    print(f"memsafe lab: wrote {args.out}/{args.prefix}.md, .json, _tradeoff.png, _grid.png")


if __name__ == "__main__":
    main()


__all__ = ["Prompt", "REGIME_NAMES", "evaluate", "main"]
