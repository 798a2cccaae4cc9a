from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# Single-threaded tests: comparisons are bit-exact only with a fixed reduction order, and CI has 2 cores.
torch.set_num_threads(1)

from helpers import SIGMA0, LatentDiffusionStandIn, load_k_diffusion, small_unet  # noqa: E402
from memsafe import guidance_from_denoiser  # noqa: E402


@pytest.fixture(scope="session")
def kd():
    return load_k_diffusion()


@pytest.fixture(scope="session")
def unet():
    return small_unet()


@pytest.fixture(scope="session")
def denoiser(kd, unet):
    """k-diffusion's CompVisDenoiser around the UNet, exactly how A1111 builds ``p.sampler.model_wrap``."""
    return kd.external.CompVisDenoiser(LatentDiffusionStandIn(unet), quantize=False)


@pytest.fixture()
def guidance(denoiser, batch):
    """eps_cond - eps_uncond of the batch at SD's first sigma, through the k-diffusion denoiser."""
    _, cond, uncond = batch
    return guidance_from_denoiser(denoiser, SIGMA0, {"cond": cond}, {"cond": uncond})


@pytest.fixture()
def batch():
    """Noise and per-image conditioning for 3 images (8x8 latents, 7 tokens of width 32)."""
    gen = torch.Generator().manual_seed(1234)
    z = torch.randn(3, 4, 8, 8, generator=gen)
    cond = torch.randn(3, 7, 32, generator=gen)
    uncond = torch.randn(3, 7, 32, generator=gen)
    return z, cond, uncond
