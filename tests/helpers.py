"""Real components for the tests: a small diffusers UNet wrapped the way A1111 wraps SD (``apply_model`` plus
``alphas_cumprod``, driven by k-diffusion's own CompVisDenoiser), and k-diffusion's samplers."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import torch
from torch import nn

SIGMA0 = 14.614642  # SD's first k-diffusion sigma (the 1000-step scaled-linear schedule)


def sd_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """SD1/SD2's schedule: scaled-linear betas from 0.00085 to 0.012 (ldm ``make_beta_schedule('linear')``)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def small_unet(cross_dim: int = 32, channels: int = 4, seed: int = 0, prediction: str = "epsilon"):
    """A real diffusers UNet2DConditionModel from a small config, random init (deterministic)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet.eval()


class LatentDiffusionStandIn(nn.Module):
    """What k-diffusion's ``CompVisDenoiser`` needs of A1111's ``sd_model`` (ldm LatentDiffusion):
    ``alphas_cumprod`` and ``apply_model(x, t, cond)`` returning the model output (eps or v)."""

    def __init__(self, unet: nn.Module, parameterization: str = "eps") -> None:
        super().__init__()
        self.unet = unet
        self.parameterization = parameterization
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod())

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=cond).sample


def load_k_diffusion() -> types.SimpleNamespace:
    """k-diffusion's real ``sampling`` and ``external`` modules, without its package ``__init__`` (which imports
    modules needing skimage, torchvision, ...). ``utils`` imports torchvision only for PIL conversions that
    sampling never uses, so that one import is satisfied by an empty module."""
    if "k_diffusion.sampling" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        assert spec is not None and spec.origin is not None, "pip install --no-deps k-diffusion==0.1.1.post1"
        package = types.ModuleType("k_diffusion")
        package.__path__ = [os.path.dirname(spec.origin)]
        sys.modules["k_diffusion"] = package
        stubs = []
        if importlib.util.find_spec("torchvision") is None:
            stubs = ["torchvision", "torchvision.transforms", "torchvision.transforms.functional"]
            for name in stubs:
                sys.modules[name] = types.ModuleType(name)
        try:
            importlib.import_module("k_diffusion.utils")
        finally:  # other libraries (diffusers) probe for torchvision: leave no trace of the stand-in
            for name in stubs:
                del sys.modules[name]
    sampling = importlib.import_module("k_diffusion.sampling")
    external = importlib.import_module("k_diffusion.external")
    return types.SimpleNamespace(sampling=sampling, external=external)
