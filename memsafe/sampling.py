"""Classifier-free guidance for k-diffusion style samplers, with the batch-wise method's unconditional-only
first steps. Hosts with their own CFG (A1111, Forge) use :func:`memsafe.uncond_only` in their callbacks instead;
this wrapper serves library users, the lab and the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .guidance import Conditioning, Guidance, concat_rows
from .methods import uncond_only


class CFGDenoiser:
    """``D_cfg(x, sigma) = D_u + scale * (D_c - D_u)`` around a denoiser ``D(x, sigma, **kwargs)``.

    Images flagged in ``uncond_images`` get ``D_u`` alone while ``uncond_only(sigma, sigmas, uncond_steps)``
    (the first ``uncond_steps`` steps of the schedule ``sigmas``). One cond row per image. With ``reuse`` (a
    Guidance built on the same denoiser and conditioning), a first call identical to the guidance's
    :attr:`~memsafe.Guidance.last_call` takes its outputs instead of calling the model again: the noise auto mode
    left unchanged, or where the per-sample method stopped, has been evaluated there already (bit for bit the
    sampler's call when those evaluations were one call of the whole batch, else up to batch-size round-off).
    """

    def __init__(
        self,
        denoiser: Callable[..., Tensor],
        cond: Conditioning,
        uncond: Conditioning,
        scale: float,
        *,
        sigmas: Sequence[float] | Tensor | None = None,
        uncond_steps: int = 0,
        uncond_images: Tensor | None = None,
        batched: bool = True,
        reuse: Guidance | None = None,
    ) -> None:
        if uncond_steps > 0 and sigmas is None:
            raise ValueError("memsafe: uncond_steps > 0 needs the sampler's sigmas")
        self.denoiser = denoiser
        self.cond, self.uncond, self.scale = cond, uncond, float(scale)
        self.sigmas = sigmas
        self.uncond_steps = uncond_steps
        self.uncond_images = uncond_images
        self.both = concat_rows(cond, uncond) if batched else None
        self.reuse = reuse
        self.calls = 0  # model calls made
        self.reused = 0  # model calls saved by reusing the guidance's last call

    def _reusable(self, x_in: Tensor, sigma_in: Tensor) -> Tensor | None:
        """The guidance's latest outputs if they were computed for exactly this call (the first step at the
        adjusted noise: auto mode's risk evaluation, the per-sample method's last check)."""
        last = self.reuse.last_call if self.reuse is not None else None
        self.reuse = None  # only the sampler's first call can be that call: later steps skip the comparison
        if last is None or self.both is None or not last.matches(x_in, sigma_in, self.both):
            return None
        return last.denoised

    def __call__(self, x: Tensor, sigma: Tensor, **_: object) -> Tensor:
        if self.both is not None:
            x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
            out = self._reusable(x_in, sigma_in)
            if out is None:
                self.calls += 1
                out = self.denoiser(x_in, sigma_in, **self.both)
            else:
                self.reused += 1
            d_cond, d_uncond = out.chunk(2)
        else:
            self.calls += 1
            d_cond = self.denoiser(x, sigma, **self.cond)
            d_uncond = self.denoiser(x, sigma, **self.uncond)
        guided = d_uncond + (d_cond - d_uncond) * self.scale
        if self.uncond_steps > 0 and self.uncond_images is not None and bool(self.uncond_images.any()):
            assert self.sigmas is not None
            early = uncond_only(sigma, self.sigmas, self.uncond_steps).to(x.device)
            use_uncond = (early & self.uncond_images.to(x.device)).view(-1, 1, 1, 1)
            guided = torch.where(use_uncond, d_uncond, guided)
        return guided
