"""Stable Diffusion WebUI Forge: what differs from A1111 1.10, for the A1111 adapter (``a1111.py``) to use.

Facts (file:line in Forge ``main`` at dfdcbab6, synced with A1111 1.10.1):
- ``modules/processing.py`` L911: the whole job runs under ``torch.inference_mode()``, and ``backend/loader.py``
  L497 loads the weights under it too: they are inference tensors, which autograd cannot save for a backward
  pass. Per-sample's gradient is therefore forward-only here (``gradient=finite_difference``).
- L1371-1385: ``x = self.rng.next()``, ``forge_objects`` reset to the job's LoRA-patched copy, then
  ``process_before_every_sampling(p, x=x, noise=x, ...)``; the sampler starts from ``p.modified_noise`` when a
  script set it (the hires pass calls the hook twice, L1510 and L1522, with ``p.is_hr_pass`` set).
- ``sd_samplers_cfg_denoiser.py``: the CFG denoiser calls the ``cfg_denoiser`` callbacks but never the
  ``cfg_denoised`` ones; it evaluates the UNet through ``backend/sampling/sampling_function.py``
  (``calc_cond_uncond_batch``: the UnetPatcher's model, its ``model_options`` and ControlNet) and gives each
  ``sampler_post_cfg_function`` of the patcher the cond and uncond predictions (L314-317); its result IS used.
- k-diffusion samplers start from ``predictor.noise_scaling(sigma0, z)`` = ``z * sigma0`` (or ``z * sqrt(1 +
  sigma0^2)`` with ``sgm_noise_multiplier``); DDIM-family samplers pass ``z`` and a timestep ``t``, which the CFG
  denoiser turns into the same sigma space (``classic_ddim_eps_estimation``: ``sigma = sigmas[t]``, ``x = z *
  sqrt(1 + sigma^2)``). Either way the model is a denoiser ``D(x, sigma)``, as in k-diffusion.

Host modules are imported inside functions only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from ..config import MitigationConfig
from ..errors import ConfigError, NotApplicableError
from ..guidance import select_rows
from .webui_args import ScriptRequest

log = logging.getLogger("memsafe")

FORGE_GRADIENT = "finite_difference"  # the only per-sample gradient Forge's inference-mode weights allow


def is_forge() -> bool:
    """Whether this WebUI is Forge (or reForge): it has the ``modules_forge`` package."""
    try:
        import modules_forge  # noqa: F401
    except ImportError:
        return False
    return True


def check_model(sd_model: Any) -> None:
    """A NotApplicableError unless this is Forge 2 (its ``backend`` package: reForge and Forge before 2.0 have
    another backend) with an eps/v UNet of SD1, SD2 or SDXL (diffusion_engine flags), what MemSafe's presets and
    guidance are for; Forge's flow models (SD3, Flux, Chroma) are named in the message."""
    try:
        import backend.sampling.sampling_function  # noqa: F401
    except ImportError as e:
        raise NotApplicableError("memsafe: this Forge has no backend.sampling (reForge, or Forge before 2.0); "
                                 "MemSafe supports Forge 2 (main) and A1111 1.6-1.10") from e
    if not any(getattr(sd_model, flag, False) for flag in ("is_sd1", "is_sd2", "is_sdxl")):
        raise NotApplicableError(
            f"memsafe: Forge model {type(sd_model).__name__} is not supported (SD1, SD2 and SDXL only)")


def prediction_type(sd_model: Any) -> str:
    """The UNet's prediction (``epsilon``, ``v_prediction``, ...: backend/modules/k_prediction.py L68-72)."""
    return str(getattr(sd_model.forge_objects.unet.model.predictor, "prediction_type", "epsilon"))


def forge_request(request: ScriptRequest) -> ScriptRequest:
    """The request as Forge serves it: per-sample's gradient (per_sample, auto) the forward-only estimate unless
    the request chose one (which :func:`check_config` then checks)."""
    if request.method == "batch_wise" or "gradient" in request.overrides:
        return request
    return replace(request, overrides={**request.overrides, "gradient": FORGE_GRADIENT})


def check_config(config: MitigationConfig) -> None:
    """A ConfigError naming ``gradient`` when per-sample may run with autograd, which Forge cannot backprop."""
    per_sample = config.method == "per_sample" or (config.method == "auto" and config.auto_method == "per_sample")
    if per_sample and config.gradient != FORGE_GRADIENT:
        raise ConfigError("gradient", f"got {config.gradient!r} on Forge, which holds the UNet's weights as inference "
                                      "tensors (no backward pass can run through them); allowed on Forge: "
                                      f"{FORGE_GRADIENT!r}, or method 'batch_wise'")


def prepare_unet(p: Any, x: Tensor) -> Any:
    """The job's UnetPatcher, loaded (with its LoRA patches) onto the device the sampler uses, as the sampler's
    own ``sampling_prepare`` does (sd_samplers_kdiffusion.py, sampling_function.py L366-399)."""
    from backend.sampling.sampling_function import sampling_prepare

    unet = p.sd_model.forge_objects.unet
    if getattr(unet, "extra_concat_condition", None) is not None:
        raise NotApplicableError("memsafe: this Forge UNet has an extra concat condition (e.g. IC-Light), which "
                                 "MemSafe's evaluations do not reproduce")
    skipped = [name for name in ("sampler_pre_cfg_function", "conditioning_modifiers")
               if unet.model_options.get(name)]
    if skipped:
        log.info("memsafe: the UNet's %s (another extension's) are not part of MemSafe's risk evaluations",
                 ", ".join(skipped))
    sampling_prepare(unet, x)
    return unet


class ForgeDenoiser:
    """``D(x, sigma, text=..., uncond=..., image_cond=...) -> denoised``: rows of the UNet's prediction as Forge's
    CFG denoiser computes them (``calc_cond_uncond_batch`` with the patcher's model options and ControlNet,
    sampling_function.py L325-363). ``text`` holds one text conditioning row per row of ``x`` (a tensor, or SDXL's
    ``{"crossattn", "vector"}``), ``uncond`` says which rows are negative-prompt rows (Forge runs those as its
    uncond batch: patches may tell them apart), ``image_cond`` is the txt2img image conditioning (inpainting
    models concatenate it)."""

    def __init__(self, unet: Any) -> None:
        self.unet = unet

    def _conditions(self, text: Any, image_cond: Tensor, x: Tensor) -> list[dict[str, Any]]:
        from backend.sampling.condition import Condition, compile_conditions

        conditions = compile_conditions(text)
        if image_cond.shape[0] == x.shape[0] and image_cond.shape[2:] == x.shape[2:]:  # L342-350
            for condition in conditions:
                condition["model_conds"]["c_concat"] = Condition(image_cond)
        if self.unet.controlnet_linked_list is not None:  # L352-357
            for condition in conditions:
                condition["control"] = self.unet.controlnet_linked_list
        return conditions

    def _run(self, x: Tensor, sigma: Tensor, cond: Any, uncond: Any) -> tuple[Tensor, Tensor]:
        from backend.sampling.sampling_function import calc_cond_uncond_batch

        return calc_cond_uncond_batch(self.unet.model, cond, uncond, x, sigma, self.unet.model_options)

    def __call__(self, x: Tensor, sigma: Tensor, *, text: Any, uncond: Tensor, image_cond: Tensor) -> Tensor:
        is_uncond = uncond.to(device="cpu", dtype=torch.bool)
        rows_c, rows_u = (~is_uncond).nonzero().flatten(), is_uncond.nonzero().flatten()

        def part(rows: Tensor) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
            at = rows.to(x.device)
            x_part = x.index_select(0, at)
            return x_part, sigma.index_select(0, at), self._conditions(
                select_rows(text, rows), image_cond.index_select(0, rows.to(image_cond.device)), x_part)

        if rows_u.numel() == 0:
            return self._run(x, sigma, self._conditions(text, image_cond, x), None)[0]
        if rows_c.numel() == 0:
            return self._run(x, sigma, [], self._conditions(text, image_cond, x))[1]
        x_c, sigma_c, cond = part(rows_c)
        x_u, sigma_u, uncond_conditions = part(rows_u)
        out = torch.empty_like(x)
        if x_c.shape == x_u.shape and torch.equal(x_c, x_u) and torch.equal(sigma_c, sigma_u):
            pred_c, pred_u = self._run(x_c, sigma_c, cond, uncond_conditions)  # one call, as the sampler's step
        else:
            pred_c = self._run(x_c, sigma_c, cond, None)[0]
            pred_u = self._run(x_u, sigma_u, [], uncond_conditions)[1]
        out.index_copy_(0, rows_c.to(x.device), pred_c.to(out.dtype))
        out.index_copy_(0, rows_u.to(x.device), pred_u.to(out.dtype))
        return out


def denoiser_kwargs(text: Any, image_cond: Tensor, uncond: bool) -> dict[str, Any]:
    """The conditioning a guidance passes to :class:`ForgeDenoiser` for ``text``'s rows (all cond or all uncond)."""
    rows = text["crossattn"].shape[0] if isinstance(text, dict) else text.shape[0]
    return {"text": text, "uncond": torch.full((rows,), uncond, dtype=torch.bool), "image_cond": image_cond}


def levels(p: Any) -> tuple[float, bool, Tensor]:
    """(first sigma, whether the sampler starts from ``z * sqrt(1 + sigma^2)``, the sigmas the CFG denoiser sees
    in visiting order) for the job's first-pass sampler."""
    from modules import shared

    sampler = p.sampler
    if hasattr(sampler, "get_sigmas"):
        sigmas = sampler.get_sigmas(p, p.steps).float().cpu()
        return float(sigmas[0]), bool(getattr(shared.opts, "sgm_noise_multiplier", False)), sigmas
    # DDIM, PLMS, UniPC: sd_samplers_cfg_denoiser.py forward, classic_ddim_eps_estimation, computed the same way
    timesteps = sampler.get_timesteps(p, p.steps).flip(0)
    acd = sampler.model_wrap_cfg.inner_model.inner_model.alphas_cumprod
    fake_sigmas = ((1 - acd) / acd) ** 0.5
    visited = fake_sigmas[timesteps.to(fake_sigmas.device).round().long().clip(0, fake_sigmas.shape[0] - 1)]
    visited = visited.float().cpu()
    return float(visited[0]), True, visited


def install_post_cfg(p: Any, function: Callable[[dict[str, Any]], Tensor]) -> Callable[[], None]:
    """Give this batch's sampler ``function`` as a post-CFG function (on a clone of the job's UnetPatcher, Forge's
    way: the sampler reads ``sd_model.forge_objects.unet``); returns what puts the job's patcher back. Forge
    itself drops the clone at the next batch and before the hires pass (processing.py L937, L1518)."""
    objects = p.sd_model.forge_objects
    original = objects.unet
    unet = original.clone()
    unet.set_model_sampler_post_cfg_function(function, disable_cfg1_optimization=True)
    objects.unet = unet

    def restore() -> None:
        if objects.unet is unet:
            objects.unet = original

    return restore
