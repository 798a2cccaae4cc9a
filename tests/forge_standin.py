"""A minimal stand-in for what differs in Stable Diffusion WebUI Forge (``main`` at dfdcbab6) from A1111 1.10.1,
on top of tests/a1111_standin.py, written from Forge's source for the tests (no Forge code is copied or needed).
References are Forge file:line. The UNet is the same real diffusers model; Forge's backend (KModel, UnetPatcher,
calc_cond_uncond_batch, its CFG denoiser and the inference-mode job) is restated in the parts MemSafe touches.

``install(sd_model)`` installs the A1111 stand-in, then ``modules_forge`` and the ``backend`` modules, and makes
``sd_model`` a Forge model (``forge_objects``); ``uninstall()`` removes everything again.

With ``MEMSAFE_FORGE_SRC`` set to a Forge checkout, Forge's own ``backend/sampling/condition.py`` and
``calc_cond_uncond_batch`` replace the restatements below (the rest stays restated): the tests then check MemSafe
against Forge's real conditioning and batching code. Forge's backend imports need ``psutil`` and
``sentencepiece`` (its Python environment has them; this project's does not).
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import types

import torch
from torch import nn

import a1111_standin as webui


# -- backend/sampling/condition.py ----------------------------------------------------------------------------
class Condition:  # L17-36: one conditioning tensor of a batch
    def __init__(self, cond):
        self.cond = cond


def compile_conditions(cond):  # L91-119
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [{"cross_attn": cond, "model_conds": {"c_crossattn": Condition(cond)}}]
    return [{"cross_attn": cond["crossattn"], "pooled_output": cond["vector"],
             "model_conds": {"c_crossattn": Condition(cond["crossattn"]), "y": Condition(cond["vector"])}}]


def compile_weighted_conditions(cond, weights):  # L122-142: one condition per AND part, weight = the last image's
    results = []
    for part in map(list, zip(*weights)):
        rows = [i for i, _ in part]
        feed = cond.advanced_indexing(rows) if hasattr(cond, "advanced_indexing") else cond[rows]
        h = compile_conditions(feed)
        h[0]["strength"] = part[-1][1]
        results += h
    return results


# -- backend/sampling/sampling_function.py ----------------------------------------------------------------------
def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    """L154-289 reduced (no areas, masks or memory-based splitting): every condition of ``cond`` and ``uncond``
    in one model call, each chunk weighted by its strength; ``transformer_options["cond_or_uncond"]`` says which
    chunk is which; ControlNet as ``control``; ``model_function_wrapper`` if set."""
    out = [torch.zeros_like(x_in), torch.zeros_like(x_in)]
    count = [torch.ones_like(x_in) * 1e-37, torch.ones_like(x_in) * 1e-37]
    to_run = [(c, 0) for c in cond] + [(u, 1) for u in (uncond or [])]
    if not to_run:
        return out[0], out[1]
    chunks = len(to_run)
    c = {}
    for key in to_run[0][0]["model_conds"]:
        c[key] = torch.cat([entry["model_conds"][key].cond for entry, _ in to_run])
    c["transformer_options"] = {**model_options.get("transformer_options", {}),
                                "cond_or_uncond": [kind for _, kind in to_run], "sigmas": timestep}
    control = to_run[0][0].get("control")
    if control is not None:
        c["control"] = control.get_control(torch.cat([x_in] * chunks), torch.cat([timestep] * chunks), c, chunks)
    x = torch.cat([x_in] * chunks)
    t = torch.cat([timestep] * chunks)
    if "model_function_wrapper" in model_options:
        output = model_options["model_function_wrapper"](model.apply_model, {"input": x, "timestep": t, "c": c})
    else:
        output = model.apply_model(x, t, **c)
    for o, (entry, kind) in zip(output.chunk(chunks), to_run):
        strength = entry.get("strength", 1.0)
        out[kind] += o * strength
        count[kind] += strength
    return out[0] / count[0], out[1] / count[1]


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options):  # L292-322
    edit_strength = sum(item.get("strength", 1) for item in cond)
    cond_pred, uncond_pred = _functions().calc_cond_uncond_batch(model, cond, uncond, x, timestep, model_options)
    cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    for fn in model_options.get("sampler_post_cfg_function", []):
        cfg_result = fn({"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model,
                         "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                         "model_options": model_options, "input": x})
    return cfg_result, cond_pred, uncond_pred


def sampling_function(self, denoiser_params, cond_scale, cond_composition):  # L325-363
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    x, timestep = denoiser_params.x, denoiser_params.sigma
    condition = sys.modules["backend.sampling.condition"]
    uncond = condition.compile_conditions(denoiser_params.text_uncond)
    cond = condition.compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    image_cond_in = denoiser_params.image_cond
    if image_cond_in.shape[0] == x.shape[0] and image_cond_in.shape[2:] == x.shape[2:]:
        for entry in uncond + cond:
            entry["model_conds"]["c_concat"] = condition.Condition(image_cond_in)
    if unet_patcher.controlnet_linked_list is not None:
        for entry in cond + uncond:
            entry["control"] = unet_patcher.controlnet_linked_list
    self.sampling_calls.append(timestep[0].item())
    return sampling_function_inner(unet_patcher.model, x, timestep, uncond, cond, cond_scale,
                                   unet_patcher.model_options)


def sampling_prepare(unet, x):  # L366-399: loads the models to the device (here: counts the calls)
    unet.prepared += 1


def _functions():
    return sys.modules["backend.sampling.sampling_function"]


@functools.cache
def forge_own_functions() -> dict | None:
    """Forge's own Condition, compile_conditions, compile_weighted_conditions and calc_cond_uncond_batch from the
    checkout at ``$MEMSAFE_FORGE_SRC``, or None when it is unset. Imported once, before the stand-in's modules
    take the ``backend`` names (the functions keep their own module globals)."""
    src = os.environ.get("MEMSAFE_FORGE_SRC")
    if not src:
        return None
    sys.path[:0] = [src, os.path.join(src, "packages_3rdparty")]
    argv, sys.argv = sys.argv, [sys.argv[0], "--always-cpu"]  # backend/args.py parses the command line
    try:
        from backend.sampling import condition, sampling_function
    finally:
        sys.argv = argv
    for name in [n for n in sys.modules if n == "backend" or n.startswith("backend.")]:
        del sys.modules[name]  # its objects stay alive through the functions' globals
    return {"Condition": condition.Condition, "compile_conditions": condition.compile_conditions,
            "compile_weighted_conditions": condition.compile_weighted_conditions,
            "calc_cond_uncond_batch": sampling_function.calc_cond_uncond_batch}


# -- the model (backend/modules/k_prediction.py, k_model.py, patcher/unet.py, diffusion_engine/base.py) ----------
class StandInPredictor(nn.Module):
    """k_prediction.Prediction for SD's eps models: the 1000 sigmas of its alphas_cumprod, ``timestep(sigma)`` as
    k-diffusion's sigma_to_t, ``noise_scaling`` (L94-104), the eps ``calculate_input``/``calculate_denoised``."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.linker = webui.K.external.CompVisDenoiser(types.SimpleNamespace(alphas_cumprod=alphas_cumprod))
        self.register_buffer("sigmas", self.linker.sigmas.clone())
        self.prediction_type = "epsilon"

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        noise = noise * torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else noise * sigma
        return noise + latent_image

    def calculate_input(self, sigma, x):
        return x / (sigma.view(-1, 1, 1, 1) ** 2 + 1.0) ** 0.5

    def timestep(self, sigma):
        return self.linker.sigma_to_t(sigma)

    def calculate_denoised(self, sigma, model_output, x):
        return x - model_output * sigma.view(-1, 1, 1, 1)


class StandInKModel(nn.Module):
    """KModel.apply_model (k_model.py L25-46): sigma in, denoised out; the UNet sees ``x / sqrt(1 + sigma^2)``."""

    def __init__(self, sd_model):
        super().__init__()
        self.sd_model = sd_model
        self.diffusion_model = sd_model.unet
        self.predictor = StandInPredictor(sd_model.alphas_cumprod)
        self.calls = 0

    def memory_required(self, input_shape):  # L48-59: bytes a call of this input takes; here every call fits
        return 0

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, y=None):
        self.calls += 1
        xc = self.predictor.calculate_input(t, x)
        timestep = self.predictor.timestep(t).float()
        cond = {"crossattn": c_crossattn, "vector": y} if y is not None else {"c_crossattn": [c_crossattn]}
        eps = self.sd_model.apply_model(xc, timestep, cond)
        return self.predictor.calculate_denoised(t, eps.float(), x)


class StandInUnetPatcher:
    """UnetPatcher (patcher/unet.py L8-35, patcher/base.py L79-145): the model, its options, clone()."""

    def __init__(self, model, model_options=None):
        self.model = model
        self.model_options = model_options if model_options is not None else {"transformer_options": {}}
        self.controlnet_linked_list = None
        self.extra_concat_condition = None
        self.prepared = 0

    def clone(self):
        n = StandInUnetPatcher(self.model, copy.deepcopy(self.model_options))
        n.controlnet_linked_list, n.extra_concat_condition = self.controlnet_linked_list, self.extra_concat_condition
        return n

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = (
            self.model_options.get("sampler_post_cfg_function", []) + [post_cfg_function])
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True


class ForgeObjects:  # diffusion_engine/base.py L7-20
    def __init__(self, unet):
        self.unet = unet

    def shallow_copy(self):
        return ForgeObjects(self.unet)


def make_forge_model(sd_model):
    """The diffusion engine's Forge parts (diffusion_engine/sd15.py L50-58): forge_objects and its copies."""
    sd_model.forge_objects = ForgeObjects(StandInUnetPatcher(StandInKModel(sd_model)))
    sd_model.forge_objects_original = sd_model.forge_objects.shallow_copy()
    sd_model.forge_objects_after_applying_lora = sd_model.forge_objects.shallow_copy()
    return sd_model


# -- samplers (modules/sd_samplers_cfg_denoiser.py, sd_samplers_kdiffusion.py, sd_samplers_timesteps.py) ---------
class ForgeCFGDenoiser(nn.Module):
    """CFGDenoiser.forward (sd_samplers_cfg_denoiser.py): conds at ``self.step``, the cfg_denoiser callback, then
    ``sampling_function`` (no cfg_denoised callback); timesteps samplers turn ``t`` into sigma space first
    (``classic_ddim_eps_estimation``) and get eps back."""

    def __init__(self, sampler, inner_model, classic_ddim_eps_estimation=False):
        super().__init__()
        self.sampler, self.step, self.p = sampler, 0, None
        self.model_wrap = inner_model
        self.classic_ddim_eps_estimation = classic_ddim_eps_estimation
        self.sampling_calls = []

    @property
    def inner_model(self):
        return self.model_wrap

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        cb = sys.modules["modules.script_callbacks"]
        state = sys.modules["modules.shared"].state
        if state.interrupted or state.skipped:
            raise webui.InterruptedException
        if self.classic_ddim_eps_estimation:
            acd = self.inner_model.inner_model.alphas_cumprod
            fake_sigmas = ((1 - acd) / acd) ** 0.5
            real_sigma = fake_sigmas[sigma.round().long().clip(0, int(fake_sigmas.shape[0]))]
            x = x * ((real_sigma ** 2.0 + 1.0) ** 0.5)[:, None, None, None]
            sigma = real_sigma
        cond_composition, cond = webui.reconstruct_multicond_batch(cond, self.step)
        uncond = webui.reconstruct_cond_batch(uncond, self.step)
        params = webui.CFGDenoiserParams(x, image_cond, sigma, 0, 0, cond, uncond, self)
        cb.cfg_denoiser_callback(params)
        denoised, _, _ = sampling_function(self, params, cond_scale, cond_composition)
        self.step += 1
        if self.classic_ddim_eps_estimation:
            return (x - denoised) / sigma[:, None, None, None]
        return denoised


class ForgeKDiffusionSampler:
    """KDiffusionSampler.sample (sd_samplers_kdiffusion.py): sampling_prepare, the start from
    ``predictor.noise_scaling(sigmas[0], x)``, the k-diffusion function on the CFG denoiser."""

    def __init__(self, funcname, sd_model):
        self.func = getattr(webui.K.sampling, funcname)
        linker = webui.K.external.CompVisDenoiser(sd_model)  # ForgeScheduleLinker: the same sigmas
        linker.inner_model = sd_model
        self.model_wrap_cfg = ForgeCFGDenoiser(self, linker)
        self.model_wrap = linker
        self.started_from = None

    def get_sigmas(self, p, steps):
        return self.model_wrap.get_sigmas(steps).cpu()

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        unet = self.model_wrap.inner_model.forge_objects.unet
        sampling_prepare(unet, x)
        sigmas = self.get_sigmas(p, steps or p.steps)
        sgm = sys.modules["modules.shared"].opts.sgm_noise_multiplier
        x = unet.model.predictor.noise_scaling(sigmas[0], x, torch.zeros_like(x), max_denoise=sgm)
        self.started_from = x.clone()
        self.model_wrap_cfg.p, self.model_wrap_cfg.step = p, 0
        extra = {"cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
                 "cond_scale": p.cfg_scale}
        torch.manual_seed(0)
        try:
            return self.func(self.model_wrap_cfg, x, sigmas, extra_args=extra, disable=True)
        except webui.InterruptedException:
            return x


class ForgeTimestepsDenoiser(nn.Module):  # sd_samplers_timesteps.py CompVisTimestepsDenoiser
    def __init__(self, model):
        super().__init__()
        self.inner_model = model
        model.alphas_cumprod = 1.0 / (model.forge_objects.unet.model.predictor.sigmas ** 2.0 + 1.0)


class ForgeDDIMSampler(webui.StandInDDIMSampler):
    """CompVisSampler with Forge's CFG denoiser (classic eps estimation) and the ddim loop (eta 0)."""

    def __init__(self, sd_model):
        self.model_wrap_cfg = ForgeCFGDenoiser(self, ForgeTimestepsDenoiser(sd_model), classic_ddim_eps_estimation=True)
        self.model_wrap = self.model_wrap_cfg.inner_model
        self.started_from = None

    def sample(self, p, x, *args, **kwargs):
        sampling_prepare(self.model_wrap.inner_model.forge_objects.unet, x)
        return super().sample(p, x, *args, **kwargs)


# -- processing (modules/processing.py) ---------------------------------------------------------------------------
class ForgeTxt2Img(webui.StandInTxt2Img):
    """StableDiffusionProcessingTxt2Img.sample of Forge (L1342-1387): the sampler starts from ``p.modified_noise``
    when a script set it (then reset to None); forge_objects are reset before the hook, and before the hires
    pass's (L1518)."""

    forge = True  # process_images: the job under inference_mode, forge_objects reset per batch (L911, L937)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.modified_noise = None  # L253

    def create_sampler(self):
        if self.sampler_name == "ddim":
            return ForgeDDIMSampler(self.sd_model)
        return ForgeKDiffusionSampler(self.sampler_name, self.sd_model)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = self.create_sampler()
        x = self.rng.next()
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        if self.modified_noise is not None:
            x = self.modified_noise
            self.modified_noise = None
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning,
                                      image_conditioning=self.txt2img_image_conditioning(x))
        if not self.enable_hr:
            return samples
        self.is_hr_pass = True
        self.sampler = self.create_sampler()
        self.rng = webui.StandInImageRNG(samples.shape[1:], [s + 1000 for s in self.seeds])
        noise = self.rng.next()
        self.hr_noise_before_hook = noise.clone()
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()  # L1518
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=conditioning,
                                                       uc=unconditional_conditioning)
        if self.modified_noise is not None:
            noise = self.modified_noise
            self.modified_noise = None
        self.hr_noise = noise.clone()
        samples = self.sampler.sample(self, samples * 0.5 + noise * 0.5, conditioning, unconditional_conditioning,
                                      steps=3, image_conditioning=self.txt2img_image_conditioning(samples))
        self.is_hr_pass = False
        return samples


# -- install ----------------------------------------------------------------------------------------------------
BACKEND_MODULES = ("modules_forge", "backend", "backend.sampling", "backend.sampling.condition",
                   "backend.sampling.sampling_function")


def install(sd_model, **opts):
    """The A1111 1.10 stand-in plus Forge's modules; ``sd_model`` becomes a Forge model. Returns ``modules``."""
    own = forge_own_functions() or {}  # before the stand-in's modules take the names
    modules = webui.install(make_forge_model(sd_model), **opts)
    for name in BACKEND_MODULES:
        module = types.ModuleType(name)
        module.__path__ = []
        sys.modules[name] = module
    condition = sys.modules["backend.sampling.condition"]
    condition.Condition = own.get("Condition", Condition)
    condition.compile_conditions = own.get("compile_conditions", compile_conditions)
    condition.compile_weighted_conditions = own.get("compile_weighted_conditions", compile_weighted_conditions)
    functions = sys.modules["backend.sampling.sampling_function"]
    functions.calc_cond_uncond_batch = own.get("calc_cond_uncond_batch", calc_cond_uncond_batch)
    functions.sampling_function, functions.sampling_prepare = sampling_function, sampling_prepare
    return modules


def uninstall():
    for name in BACKEND_MODULES:
        sys.modules.pop(name, None)
    webui.uninstall()
