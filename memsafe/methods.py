"""The paper's methods on the initial latent ``z``: batch-wise (Alg. 1), per-sample (Alg. 2), the risk score,
auto mode, and the unconditional-only-first-steps decision used while sampling.

Everything is per image: an image's result depends only on its own noise, conditioning and the parameters, never
on the other images of its batch (batched == one at a time, within float tolerance).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import ops
from .checkpointing import CheckpointPlan, PlanSummary, checkpoint_blocks, checkpointed, frozen_parameters
from .config import MitigationConfig, ScaledParams
from .errors import GuidanceError, InputError, Interrupted
from .guidance import GuidanceFn

_log = logging.getLogger(__name__)

# Adjusted noise whose RMS (||z|| / sqrt(numel); a unit-variance draw's is 1 ± 1/sqrt(2 numel): ± 0.006 for a
# 4x64x64 latent) leaves [1/NOISE_RMS_LIMIT, NOISE_RMS_LIMIT] is no longer like the noise the model was trained
# on. Chosen on the lab model (seeds 100-107 and 300-315) and measured by its evaluation (seeds 0-15,
# bench/results/lab.md, column "noise out of distribution"): per-sample reaches its target on the point-mass
# captions, which it cannot escape otherwise, by growing the noise (RMS 1.20 median) into noise-like, off-prompt
# images; the band catches every one of those that came out off-prompt (89% of all their images are flagged), and
# flags 2% of the CFG-driven and 9% of the generic images that per-sample adjusts (auto leaves generic prompts
# alone); batch-wise at the lab preset never leaves it.
NOISE_RMS_LIMIT = 1.10
# ... widened for latents so small that a plain draw's own spread approaches it (below ~800 elements): the band
# is at least this many of those spreads, so a plain draw falls outside it with a probability of about 1e-4.
NOISE_RMS_SPREADS = 4.0


def noise_rms_limit(numel: int) -> float:
    """The largest RMS an adjusted noise of ``numel`` elements per image may have without a warning (the smallest
    is its reciprocal): :data:`NOISE_RMS_LIMIT`, or ``1 + NOISE_RMS_SPREADS / sqrt(2 numel)`` where that is
    larger."""
    return max(NOISE_RMS_LIMIT, 1 + NOISE_RMS_SPREADS / math.sqrt(2 * numel))


def noise_rms(z: Tensor) -> Tensor:
    """[B] float32 on the CPU: the root mean square of each image's noise, ``||z_i|| / sqrt(numel(z_i))`` (1 for
    unit-variance Gaussian noise, up to its spread ``1 / sqrt(2 numel)``), summed in float64."""
    return z.detach().double().flatten(1).pow(2).mean(1).sqrt().float().cpu()


@dataclass
class Evaluations:
    """Guidance evaluations spent, counted per image: one forward = ``eps_tilde`` of one image (a cond and an
    uncond model row); one backward = one vector-Jacobian product through it."""

    forward: int = 0
    backward: int = 0


@dataclass(frozen=True)
class ProgressInfo:
    """What ``progress`` receives after every iteration."""

    method: str
    iteration: int  # iterations done so far (1-based)
    max_iterations: int
    norms: Tensor  # [B] float32 on the CPU: the latest ||eps_tilde|| of every image of the batch
    active: int  # images still being adjusted


@dataclass
class AdjustResult:
    """What :func:`adjust_noise` returns. Per-image tensors have shape ``[B]`` and live on the CPU."""

    z: Tensor  # the adjusted latent, same shape, dtype and device as the input
    norm_before: Tensor  # ||eps_tilde(z)|| before (NaN where not evaluated, e.g. method off)
    norm_after: Tensor  # ||eps_tilde(z)|| after (NaN where not measured)
    iterations: Tensor  # int64: optimizer steps (per-sample) or iterations (batch-wise) per image
    evaluations: Evaluations
    applied: list[str]  # per image: "off", "none" (auto, below threshold), "batch_wise" or "per_sample"
    scaled: ScaledParams  # rho, target and risk threshold at this latent size
    risk: Tensor | None = None  # auto mode: the risk score of every image
    uncond_images: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # [B] bool
    checkpoint_plan: PlanSummary | None = None  # per-sample with checkpointing under a budget: what it chose
    noise_rms: Tensor = field(default_factory=lambda: torch.zeros(0))  # [B]: noise_rms(z) of the returned z

    def still_at_risk(self) -> Tensor:
        """[B] bool: images whose measured norm after adjustment is still above what their method aims for (the
        target for per-sample, the risk threshold otherwise). Unmeasured (NaN) norms are not flagged."""
        limit = torch.tensor(
            [self.scaled.target if a == "per_sample" else self.scaled.risk_threshold for a in self.applied]
        )
        return self.norm_after > limit  # NaN compares False

    @property
    def noise_rms_limit(self) -> float:
        """The band :meth:`out_of_distribution` holds ``noise_rms`` to, ``[1 / limit, limit]``, at this latent's
        size (:func:`noise_rms_limit`; :data:`NOISE_RMS_LIMIT` at SD sizes)."""
        return noise_rms_limit(self.z[0].numel())

    def out_of_distribution(self) -> Tensor:
        """[B] bool: adjusted images (batch-wise or per-sample) whose returned noise has an RMS outside
        ``[1 / noise_rms_limit, noise_rms_limit]``: reaching the target took noise unlike a Gaussian draw, and the
        image may come out distorted or off-prompt. Untouched images are never flagged, whatever their seed drew."""
        adjusted = torch.tensor([a in ("batch_wise", "per_sample") for a in self.applied], dtype=torch.bool)
        limit = self.noise_rms_limit
        outside = (self.noise_rms > limit) | (self.noise_rms < 1 / limit)
        return adjusted & outside


# -- input checks ----------------------------------------------------------------------------------------------
def _check_z(z: Tensor) -> None:
    if not isinstance(z, Tensor):
        raise InputError(f"memsafe: z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 4 or z.shape[0] < 1 or z.numel() == 0:
        raise InputError(f"memsafe: z must have shape [B, C, H, W] with B >= 1, got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise InputError(f"memsafe: z must be a floating-point tensor, got {z.dtype}")
    bad = (~torch.isfinite(z)).flatten(1).any(1)
    if bad.any():
        raise InputError(f"memsafe: z contains NaN or Inf in images {bad.nonzero().flatten().tolist()}")


def _check_finite(norms: Tensor, index: Tensor, what: str) -> None:
    bad = ~torch.isfinite(norms)
    if bad.any():
        images = index.cpu()[bad.cpu()].tolist()
        raise GuidanceError(
            f"memsafe: the model returned NaN/Inf for images {images} ({what}); the noise was left unchanged. "
            "Check the model (precision, VAE/UNet NaN) or lower lr/rho."
        )


# -- evaluation with counting, on a subset of images ---------------------------------------------------------
class _Evaluator:
    """Evaluates a guidance on some images of the batch, as (cond_part, uncond_part) pairs, and counts."""

    def __init__(self, guidance: GuidanceFn, z_full: Tensor, evaluations: Evaluations) -> None:
        self._guidance = guidance
        self._z_full = z_full
        self._evaluations = evaluations
        self._subsets: dict[tuple[int, ...], GuidanceFn] = {}  # recent restrictions (chunks alternate)

    def _restricted(self, index: Tensor) -> GuidanceFn:
        batch = self._z_full.shape[0]
        key = tuple(index.tolist())
        if key == tuple(range(batch)):
            return self._guidance
        if key not in self._subsets:
            if len(self._subsets) >= 16:
                self._subsets.pop(next(iter(self._subsets)))
            select = getattr(self._guidance, "select", None)
            if select is not None:
                self._subsets[key] = select(index.cpu())
            else:
                # A plain callable: evaluate the whole batch with these rows replaced (correct, not cheaper).
                def subset(z_rows: Tensor, _index: Tensor = index) -> Tensor:
                    z_all = self._z_full.detach().clone().index_put((_index,), z_rows)
                    return self._guidance(z_all).index_select(0, _index)

                self._subsets[key] = subset
        return self._subsets[key]

    def pair(self, z_rows: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        fn = self._restricted(index)
        pair = getattr(fn, "pair", None)
        if pair is not None:
            cond_part, uncond_part = pair(z_rows)
        else:
            diff = fn(z_rows)
            if not isinstance(diff, Tensor) or diff.shape != z_rows.shape:
                got = tuple(diff.shape) if isinstance(diff, Tensor) else type(diff).__name__
                raise InputError(f"memsafe: guidance returned {got} for z of shape {tuple(z_rows.shape)}")
            cond_part, uncond_part = diff, torch.zeros_like(diff)
        self._evaluations.forward += z_rows.shape[0]
        return cond_part, uncond_part

    def diff_norm(self, z_rows: Tensor, index: Tensor, what: str, **kw: object) -> ops.DiffNorm:
        with torch.no_grad():
            cond_part, uncond_part = self.pair(z_rows, index)
            result = ops.guidance_diff_norm(cond_part, uncond_part, **kw)
        _check_finite(result.norms, index, what)
        return result

    def vjp(self, z_rows: Tensor, outputs: tuple[Tensor, Tensor], seed: Tensor, images: int) -> Tensor:
        """d(sum_i <seed_i, eps_tilde_i>)/dz: gradients with respect to ``z_rows`` only (never the model's)."""
        roots, grads = [], []
        for out, sign in zip(outputs, (1.0, -1.0), strict=True):
            if out.requires_grad:
                roots.append(out)
                grads.append((seed * sign).to(out.dtype))
        if not roots:
            raise InputError(
                "memsafe: per_sample needs a guidance differentiable in z (its output has no grad_fn)"
            )
        (grad,) = torch.autograd.grad(roots, [z_rows], grad_outputs=grads)
        self._evaluations.backward += images
        return grad


class _Recompute:
    """Whether and where the per-sample backward recomputes activations (:mod:`memsafe.checkpointing`):
    ``always`` every part of the UNet; ``budget`` as few parts as ``budget`` bytes allow (a
    :class:`~memsafe.checkpointing.CheckpointPlan`: the first iteration recomputes every part and measures them,
    the next ones keep what fits); ``never``; or ``on_oom``: nothing until a CUDA out-of-memory error, then a
    plan within the free memory, after a second error every part."""

    def __init__(self, model: torch.nn.Module | None, mode: str, budget: int | None) -> None:
        self.model = model
        self.mode = mode
        self.budget = budget
        self.on = mode in ("always", "budget") and model is not None
        self._blocks: list[torch.nn.Module] | None = None
        self.plan: CheckpointPlan | None = None
        if self.on and mode == "budget":
            self.plan = self._new_plan()

    def _parts(self) -> list[torch.nn.Module]:
        assert self.model is not None
        if self._blocks is None:  # found once, when first needed (not on the calls that never need them)
            self._blocks = checkpoint_blocks(self.model)
        return self._blocks

    def _new_plan(self) -> CheckpointPlan:
        assert self.model is not None
        return CheckpointPlan(self.model, self._parts(), self.budget)

    def context(self) -> AbstractContextManager[None]:
        if not self.on or self.model is None:
            return nullcontext()
        return checkpointed(self._parts(), self.plan)

    def begin_iteration(self) -> None:
        if self.on and self.plan is not None:
            self.plan.begin_iteration()

    def call(self, images: int) -> AbstractContextManager[None]:
        """Around one model call's forward and backward pass: the plan measures it while it is measuring."""
        if not self.on or self.plan is None:
            return nullcontext()
        return self.plan.chunk(images)

    def end_iteration(self, device: torch.device) -> None:
        if self.on and self.plan is not None:
            self.plan.decide(device)

    def escalate(self) -> str | None:
        """The next step after an out-of-memory error: ``"plan"`` (checkpointing from now on, within the free
        memory), ``"all"`` (every part, when a plan's choice did not fit), or None (nothing left to recompute:
        the caller splits the batch)."""
        if self.mode == "never" or self.model is None:
            return None
        if not self.on:
            self.on = True
            self.plan = self._new_plan()
            return "plan"
        if self.plan is not None and self.plan.keep:
            self.plan.drop()
            return "all"
        return None

    @property
    def summary(self) -> PlanSummary | None:
        return self.plan.summary if self.plan is not None else None


# -- the methods -----------------------------------------------------------------------------------------------
def _batch_wise(
    z: Tensor,
    index: Tensor,
    ev: _Evaluator,
    config: MitigationConfig,
    scaled: ScaledParams,
    first: tuple[Tensor, Tensor] | None,
    report: Callable[[int, int, Tensor, int], None],
    should_stop: Callable[[], bool] | None,
) -> Tensor:
    """Paper Alg. 1 on the images ``index`` of ``z`` (in place). Returns their norms before adjustment."""
    z_rows = z.index_select(0, index)
    norm_before = torch.full((index.numel(),), math.nan)
    for it in range(config.iterations):
        _poll(should_stop)
        if it == 0 and first is not None:
            d = ops.guidance_diff_norm(*first, rho=scaled.rho)
        else:
            d = ev.diff_norm(z_rows, index, f"batch-wise iteration {it + 1}", rho=scaled.rho)
        if it == 0:
            norm_before = d.norms.cpu()
        assert d.probe is not None
        probed = ev.diff_norm(z_rows + d.probe, index, f"batch-wise probe {it + 1}")
        ops.batchwise_update_(z_rows, probed.diff, d.diff, config.gamma)
        report(it + 1, config.iterations, d.norms, index.numel())
    z.index_copy_(0, index, z_rows)
    return norm_before


def _per_sample(
    z: Tensor,
    index: Tensor,
    ev: _Evaluator,
    config: MitigationConfig,
    scaled: ScaledParams,
    report: Callable[[int, int, Tensor, int], None],
    should_stop: Callable[[], bool] | None,
    max_batch: int | None,
    recompute: _Recompute,
) -> tuple[Tensor, Tensor, Tensor]:
    """Paper Alg. 2 for every image ``index`` of ``z`` at once (in place): per-image AdamW state, step counts and
    stopping, so each image follows exactly the trajectory it would follow alone. An image stops as soon as its
    norm is <= target (checked before each step, as the paper's code does) or after ``max_iterations`` steps; a
    stopped image is no longer evaluated. Returns per-image (norm_before, norm_after, steps).

    The gradient of ``||eps_tilde||`` is ``J^T u`` (``J = d eps_tilde / dz``, ``u = eps_tilde / ||eps_tilde||``):
    by backprop (``gradient="autograd"``, the paper), or forward-only as ``(eps_tilde(z + h u) - eps_tilde(z)) / h``
    (``"finite_difference"``), which is ``J u``: equal to ``J^T u`` for a conservative field such as a score
    model's, the same assumption behind the batch-wise method's probe. Model calls take at most ``max_batch``
    images; on a CUDA out-of-memory error the iteration is retried, first with activation checkpointing
    (``recompute``, if allowed and not yet on), then with the batch halved.
    """
    n = index.numel()
    device = z.device
    z_rows = z.index_select(0, index)
    exp_avg, exp_avg_sq = torch.zeros_like(z_rows), torch.zeros_like(z_rows)
    steps = torch.zeros(n, dtype=torch.long, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    norm_before = torch.full((n,), math.nan, device=device)
    norm_after = torch.full((n,), math.nan, device=device)
    grad = torch.zeros_like(z_rows)
    chunk = max(1, max_batch or n)
    # One host sync per iteration (reading which images are still active) lets finished images leave the
    # model's batch; it is negligible next to a forward and backward pass through the model.
    for it in range(config.max_iterations + 1):
        _poll(should_stop)
        live = active.nonzero().flatten()
        if live.numel() == 0:
            break
        while True:
            try:
                grad.zero_()
                recompute.begin_iteration()
                with recompute.context():
                    norms, keep = _norms_and_gradients(z_rows, live, index, ev, config, scaled, steps, grad, it,
                                                       chunk, recompute)
                recompute.end_iteration(device)
                break
            except torch.cuda.OutOfMemoryError:
                step = recompute.escalate() if config.gradient == "autograd" else None
                if step == "plan":
                    _log.warning("memsafe: CUDA out of memory in the per-sample backward pass; recomputing the "
                                 "UNet's activations from now on, as few as the free memory allows (activation "
                                 "checkpointing: same result, slower)")
                elif step == "all":
                    _log.warning("memsafe: CUDA out of memory in the per-sample backward pass; recomputing all of "
                                 "the UNet's activations from now on")
                else:
                    if chunk == 1:
                        raise
                    chunk = max(1, min(chunk, live.numel()) // 2)
                    _log.warning("memsafe: CUDA out of memory in per-sample; %d image(s) per model call from now on",
                                 chunk)
                torch.cuda.empty_cache()
        if it == 0:
            norm_before.index_copy_(0, live, norms)
        norm_after.index_copy_(0, live, norms)
        active.index_copy_(0, live, keep)
        report(it, config.max_iterations, norm_after, int(keep.sum()))
        if not bool(keep.any()):
            break
        if config.optimizer == "polyak":
            polyak_step_(z_rows, grad, norm_after, active, steps, aim=POLYAK_AIM * scaled.target,
                         max_rms_step=config.max_step, hold_norm_steps=config.hold_norm_steps)
        else:
            ops.adamw_step_(z_rows, grad, exp_avg, exp_avg_sq, steps, active, lr=config.lr,
                            weight_decay=config.weight_decay)
    z.index_copy_(0, index, z_rows)
    return norm_before.cpu(), norm_after.cpu(), steps.cpu()


POLYAK_AIM = 0.9  # polyak steps aim a little below the target, so that round-off does not cost an extra step


def polyak_step_(z: Tensor, grad: Tensor, norms: Tensor, active: Tensor, steps: Tensor, *, aim: float,
                 max_rms_step: float, hold_norm_steps: int = 0) -> None:
    """One Polyak step per ACTIVE image, in place: ``z -= (||eps_tilde|| - aim) / ||g||^2 * g``, the step length
    to reach ``aim`` if ``||eps_tilde||`` were linear along ``g``, capped at ``max_rms_step * sqrt(numel)``.
    The optimum value is known here (the target), which is what Polyak's step size needs; inactive images are
    left bit-identical.

    An image that has taken fewer than ``hold_norm_steps`` steps is scaled back to its norm ``||z||`` from before
    the step: those first, largest steps only turn the noise, so its norm stays the seed's; later steps are free,
    so that an image whose copy can only be left by changing the norm still leaves it (on the lab, README "Held
    norm": 2 held steps at ``max_step`` 0.1 take about one iteration fewer at the same efficacy). 0 (the
    default) leaves every step as above."""
    held = active & (steps < hold_norm_steps) if hold_norm_steps > 0 else None
    if held is not None:
        norm_before = _row_norms(z)
    g2 = grad.flatten(1).pow(2).sum(1)
    g_norm = g2.sqrt()
    length = (norms - aim).clamp_min(0) / g_norm.clamp_min(torch.finfo(g_norm.dtype).tiny)
    length = length.clamp_max(max_rms_step * math.sqrt(z[0].numel()))
    coef = torch.where(active & (g_norm > 0), length / g_norm.clamp_min(torch.finfo(g_norm.dtype).tiny),
                       torch.zeros_like(length))
    z.sub_(grad * coef.view(-1, *([1] * (z.dim() - 1))))
    if held is not None:
        tiny = torch.finfo(torch.float32).tiny
        ratio = torch.where(held, norm_before / _row_norms(z).clamp_min(tiny), torch.ones_like(norm_before))
        z.mul_(ratio.to(z.dtype).view(-1, *([1] * (z.dim() - 1))))
    steps.add_(active.long())


def _row_norms(z: Tensor) -> Tensor:
    """``||z_i||`` per image, accumulated and returned in float32 whatever ``z``'s dtype: the held step divides
    two of them, and a half-precision squared sum of an SDXL latent (65536 unit-variance elements) overflows."""
    return torch.linalg.vector_norm(z.flatten(1), dim=1, dtype=torch.float32)


def _norms_and_gradients(
    z_rows: Tensor,
    live: Tensor,
    index: Tensor,
    ev: _Evaluator,
    config: MitigationConfig,
    scaled: ScaledParams,
    steps: Tensor,
    grad: Tensor,
    it: int,
    chunk: int,
    recompute: _Recompute,
) -> tuple[Tensor, Tensor]:
    """Norms of the ``live`` images and whether each goes on; writes the gradient of those that go on into
    ``grad`` (rows of ``z_rows``). Works through ``live`` in chunks of ``chunk`` images."""
    all_norms, all_keep = [], []
    for rows in live.split(chunk):
        images = index.index_select(0, rows.to(index.device))
        everyone = torch.ones_like(rows, dtype=torch.bool)
        if config.gradient == "autograd":
            z_live = z_rows.index_select(0, rows).requires_grad_(True)
            with recompute.call(rows.numel()):
                with torch.enable_grad():
                    outputs = ev.pair(z_live, images)
                d = ops.guidance_diff_norm(outputs[0].detach(), outputs[1].detach(), active=everyone)
                _check_finite(d.norms, images, f"per-sample iteration {it}")
                keep = ops.stop_test(d.norms, steps.index_select(0, rows), everyone, scaled.target,
                                     config.max_iterations)
                if bool(keep.any()):
                    assert d.seed is not None
                    seed = d.seed * keep.view(-1, 1, 1, 1).to(d.seed.dtype)
                    grad.index_copy_(0, rows, ev.vjp(z_live, outputs, seed, int(keep.sum())))
                del outputs, z_live
        else:
            z_live = z_rows.index_select(0, rows)
            d = ev.diff_norm(z_live, images, f"per-sample iteration {it}", active=everyone)
            keep = ops.stop_test(d.norms, steps.index_select(0, rows), everyone, scaled.target,
                                 config.max_iterations)
            going = keep.nonzero().flatten()
            if going.numel() > 0:
                assert d.seed is not None
                h = scaled.fd_radius
                probe = ev.diff_norm(z_live.index_select(0, going) + h * d.seed.index_select(0, going),
                                     images.index_select(0, going.to(images.device)), f"per-sample probe {it}")
                estimate = (probe.diff.float() - d.diff.index_select(0, going).float()) / h
                grad.index_copy_(0, rows.index_select(0, going), estimate)
        all_norms.append(d.norms)
        all_keep.append(keep)
    return torch.cat(all_norms), torch.cat(all_keep)


def _poll(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise Interrupted("memsafe: stopped on request (interrupt/skip); the noise was left unchanged")


# -- public API ------------------------------------------------------------------------------------------------
def risk_score(z: Tensor, guidance: GuidanceFn) -> Tensor:
    """Per-image ``||eps_tilde(z)||`` (float32, on the CPU) at the first noise level: the memorization risk, on
    the same scale as the per-sample ``target`` (Wen et al. 2024 detect memorization with this magnitude)."""
    _check_z(z)
    z32 = z.detach().float()
    index = torch.arange(z.shape[0], device=z.device)
    return _Evaluator(guidance, z32, Evaluations()).diff_norm(z32, index, "risk score").norms.cpu()


CHECKPOINTING = ("on_oom", "always", "never", "budget")


def adjust_noise(
    z: Tensor,
    guidance: GuidanceFn,
    config: MitigationConfig,
    *,
    progress: Callable[[ProgressInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    measure_after: bool = True,
    max_batch: int | None = None,
    model: torch.nn.Module | None = None,
    checkpointing: str = "on_oom",
    memory_budget: int | None = None,
) -> AdjustResult:
    """Adjust the initial noise ``z`` ([B, C, H, W], unit variance) per ``config.method``.

    - ``off``: ``z`` back unchanged, nothing evaluated.
    - ``batch_wise``: paper Alg. 1 (no autograd); sampling must then use the unconditional prediction for the
      first ``config.uncond_steps`` steps of the images in ``result.uncond_images``.
    - ``per_sample``: paper Alg. 2 (AdamW on ``z``, gradients with respect to ``z`` only).
    - ``auto``: the risk score decides; images below ``risk_threshold`` come back bit-identical.

    ``progress`` is called after every iteration; ``should_stop()`` is polled before every iteration and stops
    the work by raising :class:`memsafe.Interrupted`. With ``measure_after`` (default), batch-wise spends one more
    evaluation to measure ``norm_after`` (a host can instead read it from its first sampling step).
    ``max_batch`` caps the images per model call of the per-sample method (memory; results are the same).
    ``model`` (the UNet the guidance runs, optional) makes the per-sample backward lighter: its parameters stop
    requiring grad while the noise is adjusted (same gradients; no activations kept for weight gradients; restored
    afterwards), and its activations can be recomputed block by block instead of kept
    (:mod:`memsafe.checkpointing`: less than half the backward pass's extra memory, about one more forward per
    iteration, the same results up to round-off): ``checkpointing="always"``, ``"never"``, ``"budget"`` (only as
    many parts as ``memory_budget`` bytes of kept activations per model call require, else as the device's free
    memory does: the first iteration recomputes every part and measures them, the next ones recompute the rest,
    :attr:`AdjustResult.checkpoint_plan` says what was chosen), or ``"on_oom"`` (default: nothing until the first
    CUDA out-of-memory error, then as ``"budget"``, after a second one every part, and only then is the batch
    halved).
    Identical inputs give bit-identical outputs on the same device. Afterwards, a denoiser-based guidance's
    :attr:`~memsafe.Guidance.last_call` is the sampler's first model call when every image was last evaluated at
    its returned noise (auto's risk evaluation for the images it left alone, per-sample's last check where each
    image stopped): ``CFGDenoiser(reuse=guidance)`` then skips that call, with the same bits when those
    evaluations were one call of the whole batch (``last_call.same_bits``), else equal up to batch-size round-off.
    """
    if not isinstance(config, MitigationConfig):
        raise InputError(f"memsafe: config must be a MitigationConfig, got {type(config).__name__}")
    _check_z(z)
    if checkpointing not in CHECKPOINTING:
        raise InputError(f"memsafe: checkpointing must be one of {', '.join(CHECKPOINTING)}, got {checkpointing!r}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise InputError(f"memsafe: model must be a torch.nn.Module, got {type(model).__name__}")
    if checkpointing in ("always", "budget") and model is None:
        raise InputError(f"memsafe: checkpointing={checkpointing!r} needs model (the UNet the guidance runs)")
    if memory_budget is not None:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
            raise InputError(f"memsafe: memory_budget must be a positive number of bytes, got {memory_budget!r}")
        if checkpointing not in ("budget", "on_oom"):
            raise InputError(f"memsafe: memory_budget applies to checkpointing='budget' or 'on_oom', not "
                             f"{checkpointing!r}")
    recompute = _Recompute(model, checkpointing, memory_budget)
    batch = z.shape[0]
    scaled = config.scaled(z[0].numel())
    evaluations = Evaluations()
    z32 = z.detach().float().clone()
    norm_before = torch.full((batch,), math.nan)
    norm_after = torch.full((batch,), math.nan)
    iterations = torch.zeros(batch, dtype=torch.long)
    applied = ["off"] * batch
    risk = None
    if config.method == "off":
        return AdjustResult(
            z.detach().clone(),
            norm_before,
            norm_after,
            iterations,
            evaluations,
            applied,
            scaled,
            uncond_images=torch.zeros(batch, dtype=torch.bool),
            noise_rms=noise_rms(z),
        )

    ev = _Evaluator(guidance, z.detach().float(), evaluations)
    everyone = torch.arange(batch, device=z.device)
    method = config.applied_method
    index = everyone
    first = None
    if config.method == "auto":
        with torch.no_grad():  # the risk evaluation is forward only; batch-wise reuses it as its first g
            cond_part, uncond_part = ev.pair(z32, everyone)
            d = ops.guidance_diff_norm(cond_part, uncond_part)
        _check_finite(d.norms, everyone, "risk score")
        risk = d.norms.cpu()
        at_risk = risk >= scaled.risk_threshold
        applied = [method if r else "none" for r in at_risk.tolist()]
        norm_before, norm_after = risk.clone(), risk.clone()
        index = at_risk.nonzero().flatten().to(z.device)
        if method == "batch_wise":
            first = (cond_part.index_select(0, index), uncond_part.index_select(0, index))
        del cond_part, uncond_part
    else:
        applied = [method] * batch

    last_norms = torch.full((batch,), math.nan)

    def report(iteration: int, total: int, norms: Tensor, active: int) -> None:
        if progress is None:
            return
        last_norms[index.cpu()] = norms.detach().float().cpu()
        progress(ProgressInfo(method, iteration, total, last_norms.clone(), active))

    if index.numel() > 0:
        if method == "batch_wise":
            before = _batch_wise(z32, index, ev, config, scaled, first, report, should_stop)
            iterations[index.cpu()] = config.iterations
            if config.method != "auto":
                norm_before[index.cpu()] = before
            if measure_after:
                z_rows = z32.index_select(0, index)
                norm_after[index.cpu()] = ev.diff_norm(z_rows, index, "norm after batch-wise").norms.cpu()
            else:
                norm_after[index.cpu()] = math.nan
        else:
            # the weights' gradients are never needed: no activations kept for them (checkpointing.py)
            with frozen_parameters(model) if model is not None else nullcontext():
                before, after, steps = _per_sample(z32, index, ev, config, scaled, report, should_stop, max_batch,
                                                  recompute)
            if config.method != "auto":
                norm_before[index.cpu()] = before
            norm_after[index.cpu()] = after
            iterations[index.cpu()] = steps

    uncond_images = torch.tensor([a == "batch_wise" for a in applied], dtype=torch.bool)
    if config.uncond_steps == 0:
        uncond_images[:] = False
    adjusted = z32.to(z.dtype)
    untouched = [i for i, a in enumerate(applied) if a in ("none", "off")]
    if untouched:  # bit-identical, whatever the dtype round trip would do
        adjusted[untouched] = z.detach()[untouched]
    return AdjustResult(
        adjusted, norm_before, norm_after, iterations, evaluations, applied, scaled, risk, uncond_images,
        recompute.summary, noise_rms(adjusted),
    )


def uncond_only(
    level: float | Tensor, schedule: Sequence[float] | Tensor, uncond_steps: int
) -> bool | Tensor:
    """Whether a model call at noise level ``level`` belongs to the first ``uncond_steps`` sampling steps, which
    the batch-wise method samples with the unconditional prediction only.

    ``schedule`` lists the levels in the order the sampler visits them (k-diffusion: ``sigmas``, descending;
    DDIM-family: the timesteps actually used, first one first). The first ``K`` steps are exactly the model calls
    at levels strictly above ``schedule[K]``: this holds for second-order and multi-call samplers too (Heun, DPM2
    and DPM++ 2S/SDE evaluate at intermediate levels inside a step), unlike a step counter. Heun's corrector of
    step ``K-1`` is evaluated at ``schedule[K]`` itself and therefore counts as guided: a call at a level cannot be
    told apart from the first call of step ``K``. A small relative tolerance absorbs float round-off.
    """
    if uncond_steps <= 0:
        return torch.zeros_like(level, dtype=torch.bool) if isinstance(level, Tensor) else False
    levels = torch.as_tensor(schedule, dtype=torch.float64).flatten()
    if uncond_steps >= levels.numel():
        return torch.ones_like(level, dtype=torch.bool) if isinstance(level, Tensor) else True
    boundary = float(levels[uncond_steps])
    threshold = boundary + 1e-4 * abs(boundary)
    if isinstance(level, Tensor):
        return level.double() > threshold
    return float(level) > threshold
