"""Generate images with and without memsafe on the lab model, through memsafe's public API only (as a user would),
and score them. Used by ``memsafe.lab.evaluate``, ``memsafe.lab.demo`` and the tests."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import memsafe

from .classifier import AttributeClassifier, load_classifier
from .data import COLOUR_NAMES, IMAGE_SIZE, SHAPES, build_dataset, generic_captions
from .metrics import alignment, nearest, pairwise_diversity, similarity
from .model import LabModel, load_model
from .sampler import ddim_sample, ddim_timesteps

GUIDANCE_SCALE = 7.0
SAMPLING_STEPS = 50
# Replication: copy similarity (metrics.similarity) to the nearest training image at or above this. Measured in
# bench/results/lab.md: fresh draws from the data distribution (new images by construction) reach 0.84 at their
# 99th percentile against the 20k training images (random stripes sometimes line up by chance), generic prompts'
# outputs stay below 0.69, and the copies that memorized prompts generate cluster at 0.86-0.99. 0.85 sits above
# 99% of chance coincidences and below the copies.
REPLICATION_THRESHOLD = 0.85

# The lab preset: the paper's methods calibrated on the lab model (16x16 RGB pixels, 768 elements per image,
# DDIM 50 steps, CFG 7); scale_with_size is off: the numbers are in the lab's own space. Measured on the
# CFG-driven prompts (bench/results/lab.md, sweeps): rho is the paper's 50 scaled to 768 elements
# (50 * sqrt(768 / 16384) = 10.8); the paper's gamma 0.7 moves ||eps_tilde|| by 5% here and leaves replication
# where it was, gamma 3 lowers replication by a third; per-sample keeps the paper's lr 0.01 (lr 0.05 pushed the
# noise out of distribution: alignment 0.5 instead of 0.9); target 0.4 sits below the CFG-driven prompts' typical
# 0.65 and above where alignment starts to fall (0.35: 0.81).
# risk_threshold 0.9 sits above 95% of the generic prompts' scores: auto flags the point-mass prompts (median 1.14).
# max_iterations is the paper's 1000: with 100, AdamW stopped short of the target on 55% of the point-mass images
# (norm 1.16 -> 0.4 takes it 110 iterations on average), which made it look better aligned there than a step that
# reaches the target (47.7% against 42.2% at 1000 iterations; Polyak 41.4%, in 12 iterations).
LAB_PRESET: dict[str, Any] = {
    "rho": 10.0,
    "gamma": 3.0,
    "iterations": 2,
    "uncond_steps": 5,
    "lr": 0.01,
    "target": 0.4,
    "max_iterations": 1000,
    "weight_decay": 0.01,
    "risk_threshold": 0.9,
    "auto_method": "per_sample",
    "scale_with_size": False,
}


def lab_config(method: str, **overrides: Any) -> memsafe.MitigationConfig:
    """A MitigationConfig with the lab preset for ``method`` ("batch_wise", "per_sample", "auto", "off")."""
    values = dict(LAB_PRESET, method=method)
    values.update(overrides)
    return memsafe.MitigationConfig.from_dict(values)


@dataclass(frozen=True)
class Method:
    """One way of sampling: a memsafe config (None: no adjustment), the CFG scale, and a CFG delay applied to
    every image without adjusting its noise (the "static transition point" baseline)."""

    label: str
    family: str  # none, guidance_1, delayed_cfg, batch_wise, per_sample, per_sample_adamw, auto
    config: memsafe.MitigationConfig | None = None
    scale: float = GUIDANCE_SCALE
    delay: int = 0
    sweep: str = ""  # the swept parameter and its value, for plots
    max_batch: int | None = None  # images per model call while adjusting (1: the paper's one image at a time)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "family": self.family, "scale": self.scale}
        if self.delay:
            out["cfg_delay_steps"] = self.delay
        if self.config is not None:
            out["config"] = self.config.to_dict()
        if self.sweep:
            out["sweep"] = self.sweep
        if self.max_batch:
            out["max_batch"] = self.max_batch
        return out


@dataclass(frozen=True)
class Prompt:
    """An evaluation prompt: its caption, regime and attributes, and the training index of its copy image."""

    caption: str
    regime: str  # cfg_driven, point_mass or generic
    colour: int
    shape: int
    copy: int | None = None


@dataclass
class Lab:
    """Everything an evaluation needs: the model, the classifier, the training images, the prompts."""

    model: LabModel
    classifier: AttributeClassifier
    train_images: Tensor
    prompts: list[Prompt]
    steps: int = SAMPLING_STEPS
    threshold: float = REPLICATION_THRESHOLD
    chunk: int = 64

    @classmethod
    def load(cls, model_path: str | None = None, classifier_path: str | None = None) -> Lab:
        """The committed model and classifier, and the training set rebuilt from the spec in the weights."""
        model = load_model(model_path)
        ds = build_dataset(model.data_spec)
        prompts = []
        for m in model.data_spec.memorized:
            prompts.append(
                Prompt(
                    m.caption,
                    m.regime,
                    COLOUR_NAMES.index(m.colour),
                    SHAPES.index(m.shape),
                    ds.copy_index[m.caption],
                )
            )
        for caption in generic_captions():
            colour, shape = caption.split()
            prompts.append(Prompt(caption, "generic", COLOUR_NAMES.index(colour), SHAPES.index(shape)))
        return cls(model, load_classifier(classifier_path), ds.images, prompts)

    def regime(self, name: str) -> list[Prompt]:
        return [p for p in self.prompts if p.regime == name]


def initial_noise(seeds: Sequence[int]) -> Tensor:
    """One unit-variance noise ``[3, 16, 16]`` per seed (``torch.Generator().manual_seed(seed)``), stacked. The
    same seed gives the same noise whatever the prompt, as in the WebUI."""
    return torch.stack(
        [
            torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(int(s)))
            for s in seeds
        ]
    )


@dataclass
class Run:
    """One method on a list of (prompt, seed) pairs: images, per-image measurements and costs."""

    method: Method
    prompts: list[Prompt]
    seeds: list[int]
    images: Tensor
    norm_before: Tensor
    norm_after: Tensor
    applied: list[str]
    iterations: Tensor
    forward: int  # guidance evaluations spent adjusting the noise (image level: one cond + one uncond row)
    backward: int
    sampling_calls: int  # model calls per image while sampling (each on a cond and an uncond row)
    seconds: float  # adjustment + sampling, wall time
    nn_sim: Tensor = field(default_factory=lambda: torch.zeros(0))
    nn_index: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    own_sim: Tensor = field(
        default_factory=lambda: torch.zeros(0)
    )  # to the prompt's duplicated image (NaN: none)
    aligned: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    align_soft: Tensor = field(default_factory=lambda: torch.zeros(0))
    # AdjustResult.out_of_distribution(): what the WebUI warns of as "noise out of distribution"
    out_of_distribution: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))


ProgressFn = Callable[[int, int], None]


def generate(
    lab: Lab,
    method: Method,
    pairs: Sequence[tuple[Prompt, int]],
    progress: ProgressFn | None = None,
    adjust_progress: Callable[[memsafe.ProgressInfo], None] | None = None,
) -> Run:
    """Generate one image per (prompt, seed) with ``method``, through memsafe's public API: build the guidance
    with :func:`memsafe.guidance_from_eps_model`, adjust the noise with :func:`memsafe.adjust_noise`, then sample
    (unconditional-only first steps for the images memsafe flags). Then score the images."""
    model, steps = lab.model, lab.steps
    t0 = float(ddim_timesteps(steps)[0])
    images, before, after, iters, outside = [], [], [], [], []
    applied: list[str] = []
    forward = backward = 0
    seconds = 0.0
    done = 0
    for start in range(0, len(pairs), lab.chunk):
        chunk = pairs[start : start + lab.chunk]
        n = len(chunk)
        z = initial_noise([s for _, s in chunk])
        cond = model.encode([p.caption for p, _ in chunk])
        uncond = model.encode([""] * n)
        guidance = memsafe.guidance_from_eps_model(
            model, t0, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}
        )
        adjusting = method.config is not None and method.config.method != "off"
        if not adjusting:  # ||eps_tilde|| of the original noise, for the report only (not part of the cost)
            risk = memsafe.risk_score(z, guidance)
        tick = time.perf_counter()
        uncond_steps, uncond_images = method.delay, torch.ones(n, dtype=torch.bool)
        if adjusting:
            assert method.config is not None
            res = memsafe.adjust_noise(
                z, guidance, method.config, progress=adjust_progress, max_batch=method.max_batch
            )
            # every method measures ||eps_tilde|| of the original noise first: no second evaluation for the report
            risk = res.risk if res.risk is not None else res.norm_before
            z = res.z
            forward += res.evaluations.forward
            backward += res.evaluations.backward
            uncond_steps = method.config.uncond_steps if method.config.uses_uncond_steps else 0
            uncond_images = res.uncond_images
            norm_after = torch.where(torch.isnan(res.norm_after), risk, res.norm_after)
            applied += list(res.applied)
            iters.append(res.iterations)
            outside.append(res.out_of_distribution())
        else:
            norm_after = risk
            applied += ["off"] * n
            iters.append(torch.zeros(n, dtype=torch.long))
            outside.append(torch.zeros(n, dtype=torch.bool))

        def sub_progress(i: int, total: int, _done: int = done, _n: int = n) -> None:
            if progress is not None:
                progress(_done + round(_n * i / total), len(pairs))

        x = ddim_sample(
            model,
            z,
            cond,
            uncond,
            scale=method.scale,
            steps=steps,
            uncond_steps=uncond_steps,
            uncond_images=uncond_images,
            progress=sub_progress,
        )
        seconds += time.perf_counter() - tick
        images.append(x.clamp(-1, 1))
        before.append(risk)
        after.append(norm_after)
        done += n
    run = Run(
        method,
        [p for p, _ in pairs],
        [s for _, s in pairs],
        torch.cat(images),
        torch.cat(before),
        torch.cat(after),
        applied,
        torch.cat(iters),
        forward,
        backward,
        steps,
        seconds,
        out_of_distribution=torch.cat(outside),
    )
    score(lab, run)
    return run


def score(lab: Lab, run: Run) -> None:
    """Fill in the nearest-training-image similarity and the alignment of every image of ``run``."""
    run.nn_sim, run.nn_index = nearest(run.images, lab.train_images)
    run.own_sim = torch.full((len(run.prompts),), math.nan)
    for i, p in enumerate(run.prompts):
        if p.copy is not None:
            run.own_sim[i] = similarity(run.images[i : i + 1], lab.train_images[p.copy : p.copy + 1])[0, 0]
    colour = torch.tensor([p.colour for p in run.prompts])
    shape = torch.tensor([p.shape for p in run.prompts])
    run.aligned, run.align_soft = alignment(lab.classifier, run.images, colour, shape)


def _spread(seeds: Sequence[int], idx: Sequence[int], values: Sequence[float] | Tensor) -> tuple[float, float, float]:
    """Of ``values[i]`` for i in ``idx``, grouped by ``seeds[i]`` (the seeds are the independent draws): (mean,
    std over seeds of the per-seed means, 95% half-width of the mean over seeds)."""
    by_seed: dict[int, list[float]] = {}
    for i in idx:
        by_seed.setdefault(seeds[i], []).append(float(values[i]))
    per_seed = [sum(v) / len(v) for v in by_seed.values()]
    if not per_seed:
        return math.nan, math.nan, math.nan
    mean = sum(per_seed) / len(per_seed)
    std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
    return mean, std, 1.96 * std / math.sqrt(len(per_seed))


def paired_difference(lab: Lab, run: Run, reference: Run, regime: str) -> dict[str, Any]:
    """``run`` minus ``reference``, image by image on the same (prompt, seed) pairs of one regime: the mean
    difference in replication and in alignment, each with its 95% half-width over seeds (the seeds are the
    independent draws, as in :func:`summarize`). Pairing removes what a prompt and a seed give both methods alike,
    so the half-widths are much narrower than the two rows' own."""
    if run.prompts != reference.prompts or run.seeds != reference.seeds:
        raise ValueError("paired_difference: the two runs must sample the same (prompt, seed) pairs")
    idx = [i for i, p in enumerate(run.prompts) if p.regime == regime]
    replication = (run.nn_sim >= lab.threshold).float() - (reference.nn_sim >= lab.threshold).float()
    alignment = run.aligned.float() - reference.aligned.float()
    out: dict[str, Any] = {"method": run.method.label, "reference": reference.method.label, "regime": regime,
                           "images": len(idx)}
    for name, diff in (("replication", replication), ("alignment", alignment)):
        mean, _, ci = _spread(run.seeds, idx, diff)
        out[f"{name}_difference"], out[f"{name}_difference_ci95"] = mean, ci
    return out


def summarize(lab: Lab, run: Run, regime: str) -> dict[str, Any]:
    """The metrics of ``run`` on the prompts of one regime: replication rate (mean, spread over seeds),
    alignment, diversity, norms before/after, how often the noise left the distribution (of all images and of
    the misaligned ones), evaluations and seconds per image."""
    idx = [i for i, p in enumerate(run.prompts) if p.regime == regime]
    if not idx:
        return {}
    rep = (run.nn_sim >= lab.threshold).tolist()
    r_mean, r_std, r_ci = _spread(run.seeds, idx, rep)
    a_mean, a_std, a_ci = _spread(run.seeds, idx, run.aligned)
    own_copy = [
        float(rep[i] and run.prompts[i].copy is not None and int(run.nn_index[i]) == run.prompts[i].copy)
        for i in idx
    ]
    by_prompt: dict[str, list[int]] = {}
    for i in idx:
        by_prompt.setdefault(run.prompts[i].caption, []).append(i)
    diversity = [pairwise_diversity(run.images[v]) for v in by_prompt.values() if len(v) > 1]
    n = len(run.prompts)
    adjusted = [run.applied[i] not in ("off", "none") for i in idx]
    misaligned = [i for i in idx if not run.aligned[i]]
    return {
        "method": run.method.label,
        "regime": regime,
        "images": len(idx),
        "seeds": len({run.seeds[i] for i in idx}),
        "replication": r_mean,
        "replication_std_over_seeds": r_std,
        "replication_ci95": r_ci,
        "replicates_own_copy": sum(own_copy) / len(own_copy),
        "own_copy_similarity_median": float(run.own_sim[idx].nanmedian())
        if regime != "generic"
        else math.nan,
        "alignment": a_mean,
        "alignment_std_over_seeds": a_std,
        "alignment_ci95": a_ci,
        "alignment_soft": float(run.align_soft[idx].mean()),
        "diversity": sum(diversity) / len(diversity) if diversity else math.nan,
        "nn_similarity_mean": float(run.nn_sim[idx].mean()),
        "norm_before": float(run.norm_before[idx].mean()),
        "norm_after": float(run.norm_after[idx].mean()),
        "adjusted_fraction": sum(adjusted) / len(adjusted),
        # how often the "noise out of distribution" warning fires, and how many of the off-prompt images it catches
        "out_of_distribution": float(run.out_of_distribution[idx].float().mean()),
        "misaligned_out_of_distribution": float(run.out_of_distribution[misaligned].float().mean())
        if misaligned
        else math.nan,
        "iterations_mean": float(run.iterations[idx].float().mean()),
        "forward_per_image": run.forward / n,
        "backward_per_image": run.backward / n,
        "sampling_calls_per_image": run.sampling_calls,
        "seconds_per_image": run.seconds / n,
    }


def pairs_for(prompts: Sequence[Prompt], seeds: Sequence[int]) -> list[tuple[Prompt, int]]:
    """Every (prompt, seed) combination, prompt-major."""
    return [(p, s) for p in prompts for s in seeds]
