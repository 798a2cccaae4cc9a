"""Deterministic DDIM (eta = 0) with classifier-free guidance on SD's schedule, and the batch-wise method's
"unconditional prediction only for the first K steps", per image.

The whole sampler is :func:`ddim_sample`; it starts from ``x_T = z`` (unit variance), the convention of
:func:`memsafe.guidance_from_eps_model`, so the noise that memsafe adjusts is exactly the sampler's start.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import memsafe

from .model import TRAIN_STEPS, sd_alphas_cumprod

EpsModel = Callable[..., Tensor]  # model(x, t, encoder_hidden_states=emb) -> eps


def ddim_timesteps(steps: int) -> Tensor:
    """The timesteps DDIM visits, first first, "trailing" spacing: 999, 979, ..., 19 for 50 steps (so the first
    noise level is SD's sigma_max = 14.61, where memsafe adjusts the noise)."""
    if not 1 <= steps <= TRAIN_STEPS:
        raise ValueError(f"steps must be in [1, {TRAIN_STEPS}], got {steps}")
    return torch.round(torch.arange(TRAIN_STEPS, 0, -TRAIN_STEPS / steps)).long() - 1


@torch.no_grad()
def ddim_sample(
    model: EpsModel,
    z: Tensor,
    cond: Tensor,
    uncond: Tensor,
    *,
    scale: float = 7.0,
    steps: int = 50,
    uncond_steps: int = 0,
    uncond_images: Tensor | None = None,
    clip: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Images ``[B, C, H, W]`` from the initial noise ``z`` (``x_T = z``) and text embeddings ``cond`` and
    ``uncond`` (``[B, L, D]``), with CFG ``eps_u + scale * (eps_c - eps_u)``.

    Images flagged in ``uncond_images`` (``[B]`` bool; default: all when ``uncond_steps > 0``) use ``eps_u`` alone
    for the first ``uncond_steps`` steps (decided by :func:`memsafe.uncond_only`, as a host does). With ``clip``,
    the predicted x0 is clipped to [-1, 1] (diffusers' ``clip_sample`` for pixel-space models). Deterministic: the
    same inputs give the same images."""
    ab = sd_alphas_cumprod()
    timesteps = ddim_timesteps(steps)
    batch = z.shape[0]
    if uncond_images is None:
        uncond_images = torch.ones(batch, dtype=torch.bool)
    mask = uncond_images.to(z.device).view(-1, 1, 1, 1)
    both = torch.cat([cond, uncond])
    x = z.float().clone()
    for i, t in enumerate(timesteps.tolist()):
        a = float(ab[t])
        a_prev = float(ab[int(timesteps[i + 1])]) if i + 1 < len(timesteps) else 1.0
        eps_c, eps_u = model(torch.cat([x, x]), float(t), encoder_hidden_states=both).chunk(2)
        eps = eps_u + scale * (eps_c - eps_u)
        if uncond_steps > 0 and memsafe.uncond_only(float(t), timesteps.tolist(), uncond_steps):
            eps = torch.where(mask, eps_u, eps)
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        if clip:
            x0 = x0.clamp(-1, 1)
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        if progress is not None:
            progress(i + 1, len(timesteps))
    return x
