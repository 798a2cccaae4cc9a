"""Models for the benchmarks: real diffusers UNet architectures from their published configs (random weights, no
download), wrapped as k-diffusion style denoisers on SD's schedule, and a deterministic Euler sampler.

The wrapper does what k-diffusion's ``CompVisDenoiser`` does for A1111 (eps model, ``c_in = 1/sqrt(sigma^2+1)``,
timestep from sigma by interpolation in log-sigma), written out so the benchmarks need no WebUI and no k-diffusion.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# Published UNet configs (the fields that define the architecture), from the models' config.json files.
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": 8, "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "norm_num_groups": 32,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}
TINY_UNET: dict[str, Any] = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": (32, 64), "attention_head_dim": 8, "cross_attention_dim": 32,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "norm_num_groups": 8,
}
CONFIGS = {"tiny": (TINY_UNET, 7), "sd15": (SD15_UNET, 77), "sdxl": (SDXL_UNET, 77)}


def sd_alphas_cumprod(steps: int = 1000) -> Tensor:
    """SD1/SD2/SDXL's training schedule: scaled-linear betas 0.00085..0.012."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


class EpsDenoiser(nn.Module):
    """``D(x, sigma, **cond) = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma), **cond)``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        ac = sd_alphas_cumprod()
        self.register_buffer("sigmas", ((1 - ac) / ac).sqrt())
        self.register_buffer("log_sigmas", self.sigmas.log())

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        log_sigma = sigma.float().log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        high = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        low = high - 1
        w = (log_sigma - self.log_sigmas[low]) / (self.log_sigmas[high] - self.log_sigmas[low])
        return low.float() + w

    def get_sigmas(self, steps: int) -> Tensor:
        """``steps`` sigmas from sigma_max down (timesteps evenly spaced, as k-diffusion's default), then 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, steps)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]
        return torch.cat([log_sigma.exp(), torch.zeros(1)])

    def forward(self, x: Tensor, sigma: Tensor, encoder_hidden_states: Tensor,
                added_cond_kwargs: dict[str, Tensor] | None = None) -> Tensor:
        c_in = (sigma**2 + 1).rsqrt().view(-1, 1, 1, 1)
        kwargs = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs is not None else {}
        eps = self.unet((x * c_in).to(self.dtype), self.sigma_to_t(sigma), encoder_hidden_states=encoder_hidden_states,
                        **kwargs).sample
        return x - eps.float() * sigma.view(-1, 1, 1, 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


@torch.no_grad()
def sample_euler(model: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigmas: Tensor) -> Tensor:
    """k-diffusion's ``sample_euler`` without churn: ``x += (x - D(x)) / sigma * (sigma_next - sigma)``."""
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        d = (x - model(x, ones * sigma)) / sigma
        x = x + d * (float(sigmas[i + 1]) - sigma)
    return x


@dataclass
class Subject:
    """A model to benchmark: its denoiser, latent shape and per-image conditioning."""

    name: str
    denoiser: EpsDenoiser
    latent: tuple[int, int, int]
    device: torch.device
    encode: Callable[[list[str]], Tensor] | None = None  # a real text encoder (the lab model), else random embeddings
    captions: tuple[str, ...] = ()

    def conditioning(self, batch: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Text embeddings for cond and uncond: the lab model's own captions (cycled) and its empty caption, or
        random embeddings (and SDXL's pooled embeddings and size ids) for the random-weight UNets."""
        if self.encode is not None:
            captions = [self.captions[i % len(self.captions)] for i in range(batch)]
            with torch.no_grad():
                return ({"encoder_hidden_states": self.encode(captions)},
                        {"encoder_hidden_states": self.encode([""] * batch)})
        gen = torch.Generator().manual_seed(seed)
        cfg, tokens = CONFIGS[self.name]
        dtype = self.denoiser.dtype

        def one() -> dict[str, Any]:
            out: dict[str, Any] = {"encoder_hidden_states": torch.randn(
                batch, tokens, cfg["cross_attention_dim"], generator=gen).to(self.device, dtype)}
            if cfg.get("addition_embed_type") == "text_time":
                out["added_cond_kwargs"] = {
                    "text_embeds": torch.randn(batch, 1280, generator=gen).to(self.device, dtype),
                    "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch).to(self.device, dtype),
                }
            return out

        return one(), one()


def build(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, latent: int | None = None,
          seed: int = 0, overrides: dict[str, Any] | None = None) -> Subject:
    """A UNet of the named architecture with random (seeded) weights, as a denoiser; no weights are downloaded.

    A freshly initialized diffusers UNet is not degenerate (unlike ldm's zero-initialized output layers), so
    eps_cond - eps_uncond is non-zero and the methods have work to do."""
    from diffusers import UNet2DConditionModel

    _require_device(device)
    if name == "lab":
        return build_lab(device)
    config, _ = CONFIGS[name]
    config = {**config, **(overrides or {})}
    torch.manual_seed(seed)
    with torch.device(device):  # initialized where it runs: an SDXL-size UNet takes minutes to init on a CPU
        unet = UNet2DConditionModel(**config)
    # requires_grad stays on, as a host leaves it (A1111 runs inference under no_grad and never switches it off):
    # the paper-exact loop pays for that, memsafe freezes the weights while it adjusts (adjust_noise(model=))
    unet = unet.to(dtype=dtype).eval()
    size = latent or config["sample_size"]
    return Subject(name, EpsDenoiser(unet).to(device), (config["in_channels"], size, size), torch.device(device))


def build_lab(device: str = "cpu") -> Subject:
    """The lab model (memsafe/lab, trained weights that really memorize) as a denoiser in pixel space (3x16x16),
    conditioned on its CFG-driven memorized captions."""
    from memsafe.lab.model import load_model

    model = load_model().to(device)
    captions = tuple(m.caption for m in model.data_spec.memorized if m.regime == "cfg_driven")
    return Subject("lab", EpsDenoiser(model.unet).to(device), (3, 16, 16), torch.device(device),
                   encode=model.encode, captions=captions)


def add_subject_arguments(p: argparse.ArgumentParser, models: tuple[str, ...] = ("tiny", "sd15", "sdxl", "lab")
                          ) -> None:
    """The options every bench command builds its model from (:func:`build`), and its CPU threads: --model,
    --device, --dtype, --latent, --threads."""
    p.add_argument("--model", default="sd15", choices=list(models))
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--latent", type=positive, default=None, help="latent side (default: the model's native size)")
    p.add_argument("--threads", type=count, default=0, help="CPU threads (default: torch's default)")


def device_name(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N`` (whether this machine has that GPU is checked when the
    model is built, :func:`build`, so that a GPU script's command lines parse on any machine)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed are cpu, cuda and cuda:N")
    return text


def _require_device(device: str) -> None:
    """Exit with a message naming --device where this torch cannot run on ``device`` (instead of a CUDA assertion
    from deep inside the model build)."""
    where = torch.device(device)
    if where.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise SystemExit(f"bench: --device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if where.index is not None and where.index >= torch.cuda.device_count():
        raise SystemExit(f"bench: --device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def _whole_number(text: str, minimum: int) -> int:
    """``text`` as an int of at least ``minimum``, else the argparse error that names the option and the bound."""
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count: give a whole number, {minimum} or more")
    return value


def count(text: str) -> int:
    """An argparse type: a whole number, 0 or more (threads, profile repeats; 0 means off or the default)."""
    return _whole_number(text, 0)


def positive(text: str) -> int:
    """An argparse type: a whole number, 1 or more (steps, batch, repeats, rounds: 0 of them measures nothing)."""
    return _whole_number(text, 1)


def set_threads(args: argparse.Namespace) -> None:
    """Apply --threads of :func:`add_subject_arguments`: torch's CPU threads, left at its default when 0."""
    if args.threads:
        torch.set_num_threads(args.threads)
