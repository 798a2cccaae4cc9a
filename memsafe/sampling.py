"""Classifier-free guidance for k-diffusion style samplers, with the batch-wise method's unconditional-only
first steps. Hosts with their own CFG (A1111, Forge) use :func:`memsafe.uncond_only` in their callbacks instead;
this wrapper serves library users, the lab and the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .guidance import Conditioning, concat_rows
from .methods import uncond_only


class CFGDenoiser:
    """``D_cfg(x, sigma) = D_u + scale * (D_c - D_u)`` around a denoiser ``D(x, sigma, **kwargs)``.

    Images flagged in ``uncond_images`` get ``D_u`` alone while ``uncond_only(sigma, sigmas, uncond_steps)``
    (the first ``uncond_steps`` steps of the schedule ``sigmas``). One cond row per image.
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
    ) -> None:
        if uncond_steps > 0 and sigmas is None:
            raise ValueError("memsafe: uncond_steps > 0 needs the sampler's sigmas")
        self.denoiser = denoiser
        self.cond, self.uncond, self.scale = cond, uncond, float(scale)
        self.sigmas = sigmas
        self.uncond_steps = uncond_steps
        self.uncond_images = uncond_images
        self.both = concat_rows(cond, uncond) if batched else None
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor, **_: object) -> Tensor:
        self.calls += 1
        if self.both is not None:
            out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **self.both)
            d_cond, d_uncond = out.chunk(2)
        else:
            d_cond = self.denoiser(x, sigma, **self.cond)
            d_uncond = self.denoiser(x, sigma, **self.uncond)
        guided = d_uncond + (d_cond - d_uncond) * self.scale
        if self.uncond_steps > 0 and self.uncond_images is not None and bool(self.uncond_images.any()):
            assert self.sigmas is not None
            early = uncond_only(sigma, self.sigmas, self.uncond_steps).to(x.device)
            use_uncond = (early & self.uncond_images.to(x.device)).view(-1, 1, 1, 1)
            guided = torch.where(use_uncond, d_uncond, guided)
        return guided
