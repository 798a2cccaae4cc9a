"""The per-iteration math of the mitigation methods, outside the model.

Every op has a pure-PyTorch reference (``*_ref``) and a public name that dispatches to the selected backend.
The references are the specification: a compiled backend must return the same numbers within the per-dtype
tolerances of the tests. All ops work per image: an image's result depends only on its own rows.

Conventions:
- ``eps_cond``/``eps_uncond``/``diff`` may be float32, float16 or bfloat16; norms are accumulated and returned in
  float32. ``z``, ``grad``, ``exp_avg``, ``exp_avg_sq`` are float32 (the working space of memsafe).
- ``active`` is a bool tensor ``[B]`` on the same device; ``step`` an int64 tensor ``[B]`` (AdamW step counts).
- An image whose guidance difference is exactly zero has no direction: its probe and seed are zero.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class DiffNorm(NamedTuple):
    """Result of :func:`guidance_diff_norm`."""

    diff: Tensor  # eps_cond - eps_uncond, dtype of the inputs
    norms: Tensor  # [B] float32, ||diff|| per image
    probe: Tensor | None  # rho * diff / ||diff|| (float32), when rho was given
    seed: Tensor | None  # diff / ||diff|| for active images, 0 elsewhere (float32), when active was given


def _per_image(v: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-image vector ``[B]`` against ``x`` of shape ``[B, ...]``."""
    return v.view((-1,) + (1,) * (x.dim() - 1))


def _safe_inverse(norms: Tensor) -> Tensor:
    """1/norm, and 0 where the norm is 0 (no direction: the probe and the seed are zero)."""
    return torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))


def guidance_diff_norm_ref(
    eps_cond: Tensor, eps_uncond: Tensor, *, rho: float | None = None, active: Tensor | None = None
) -> DiffNorm:
    """``diff = eps_cond - eps_uncond`` and its per-image L2 norm (float32 accumulation).

    With ``rho``, also the batch-wise probe ``rho * diff / ||diff||``; with ``active``, also the backward seed
    ``diff / ||diff||`` (the gradient of ``||diff||`` with respect to ``diff``) for active images, zero for the others.
    """
    diff = eps_cond - eps_uncond
    d32 = diff.float()
    norms = d32.flatten(1).norm(dim=1)
    inv = _per_image(_safe_inverse(norms), d32)
    probe = d32 * (inv * rho) if rho is not None else None
    seed = d32 * (inv * _per_image(active.to(d32.dtype), d32)) if active is not None else None
    return DiffNorm(diff, norms, probe, seed)


def batchwise_update_ref(z: Tensor, diff_probe: Tensor, diff: Tensor, gamma: float) -> Tensor:
    """In place: ``z -= gamma * (diff_probe - diff)`` (paper Alg. 1, line 5). Returns ``z``."""
    return z.sub_((diff_probe.float() - diff.float()).mul_(gamma))


def adamw_step_ref(
    z: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    active: Tensor,
    *,
    lr: float,
    weight_decay: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> None:
    """One AdamW step per ACTIVE image, in place on ``z``, ``exp_avg``, ``exp_avg_sq`` and ``step``.

    Exactly ``torch.optim.AdamW`` (decoupled weight decay, bias correction by the image's own step count) applied
    to each active image as if it were optimized alone; inactive images are left bit-identical.
    """
    new_step = step + active.long()
    t = new_step.clamp_min(1).double()
    bias1 = _per_image((1 - beta1**t).float(), z)
    bias2_sqrt = _per_image((1 - beta2**t).sqrt().float(), z)
    mask = _per_image(active, z)

    m = exp_avg * beta1 + grad * (1 - beta1)
    v = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    decayed = z * (1 - lr * weight_decay)
    updated = decayed - (lr / bias1) * m / (v.sqrt() / bias2_sqrt + eps)

    z.copy_(torch.where(mask, updated, z))
    exp_avg.copy_(torch.where(mask, m, exp_avg))
    exp_avg_sq.copy_(torch.where(mask, v, exp_avg_sq))
    step.copy_(new_step)


def stop_test_ref(norms: Tensor, step: Tensor, active: Tensor, target: float, max_iterations: int) -> Tensor:
    """Images still to optimize: active, above the target and with steps left (a new bool tensor)."""
    return active & (norms > target) & (step < max_iterations)


# Dispatch. The compiled backends plug in here (see memsafe/ops_backend.py once it exists); until then the
# reference is the implementation.
guidance_diff_norm = guidance_diff_norm_ref
batchwise_update_ = batchwise_update_ref
adamw_step_ = adamw_step_ref
stop_test = stop_test_ref
