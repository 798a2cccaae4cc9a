"""A minimal stand-in for the parts of the AUTOMATIC1111 WebUI (v1.10.1) that MemSafe touches, written from that
version's source for the tests (no WebUI code is copied or needed). Every attribute is justified by a reference
to the WebUI file and line it mirrors. The model is real (a diffusers UNet behind k-diffusion's CompVisDenoiser,
as A1111 wraps SD), so are the k-diffusion samplers.

Installed with ``install(...)`` as the ``modules`` package in ``sys.modules`` and removed by ``uninstall()``.
"""

from __future__ import annotations

import math
import sys
import types
from collections import namedtuple
from contextlib import closing
from typing import Any

import torch
from torch import nn

from helpers import load_k_diffusion, sd_alphas_cumprod

K = load_k_diffusion()
TEXT_DIM = 32
TOKENS = 7

# -- modules.prompt_parser (prompt_parser.py) -----------------------------------------------------------------
ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])  # L136


class ComposableScheduledPromptConditioning:  # L240-243: one AND part with its weight
    def __init__(self, schedules, weight=1.0):
        self.schedules, self.weight = schedules, weight


class MulticondLearnedConditioning:  # L246-249: per image, its AND parts
    def __init__(self, shape, batch):
        self.shape, self.batch = shape, batch


def _active(schedules, step):  # L289-293 / L330-334: the first schedule entry whose end_at_step >= step
    for entry in schedules:
        if step <= entry.end_at_step:
            return entry.cond
    return schedules[0].cond


class DictWithShape(dict):  # L270-277: SDXL conds, a dict that answers .shape like a tensor
    @property
    def shape(self):
        return self["crossattn"].shape

    def advanced_indexing(self, item):  # Forge's own addition (prompt_parser.py L286-291), for its AND prompts
        return DictWithShape({k: v[item] for k, v in self.items() if isinstance(v, torch.Tensor)})


def _stack(rows):  # L297-304 / L339-344: SDXL conds are dicts of tensors, stacked per key
    if isinstance(rows[0], dict):
        return DictWithShape({k: torch.stack([r[k] for r in rows]) for k in rows[0]})
    return torch.stack(rows)


def reconstruct_cond_batch(c, current_step):  # L280-304: one row per image
    return _stack([_active(schedules, current_step) for schedules in c])


def reconstruct_multicond_batch(c, current_step):  # L321-346: rows of all AND parts, and (row, weight) per image
    tensors, conds_list = [], []
    for parts in c.batch:
        conds_list.append([])
        for part in parts:
            conds_list[-1].append((len(tensors), part.weight))
            tensors.append(_active(part.schedules, current_step))
    return conds_list, _stack(tensors)


def encode(prompt: str) -> torch.Tensor | dict[str, torch.Tensor]:
    """A deterministic toy text encoder: the prompt's words seed the token embeddings ('' gives the uncond).
    With an SDXL model loaded, a dict like sd_models_xl.get_learned_conditioning's (crossattn + pooled vector)."""
    seed = sum((i + 1) * ord(ch) for i, ch in enumerate(prompt)) % (2**31)
    gen = torch.Generator().manual_seed(seed)
    crossattn = torch.randn(TOKENS, TEXT_DIM, generator=gen)
    if getattr(sys.modules["modules.shared"].sd_model, "is_sdxl", False):
        return {"crossattn": crossattn, "vector": torch.randn(8, generator=gen)}
    return crossattn


def learned_conditioning(prompts, steps):  # get_learned_conditioning: a one-entry schedule per prompt
    return [[ScheduledPromptConditioning(steps, encode(p))] for p in prompts]


def multicond_learned_conditioning(prompts, steps):  # get_multicond_learned_conditioning, ``AND`` with ``:w``
    batch = []
    for prompt in prompts:
        parts = []
        for text in prompt.split(" AND "):
            text, _, weight = text.partition(" :")
            parts.append(ComposableScheduledPromptConditioning([ScheduledPromptConditioning(steps, encode(text))],
                                                               float(weight or 1.0)))
        batch.append(parts)
    return MulticondLearnedConditioning((len(prompts),), batch)


# -- modules.script_callbacks (script_callbacks.py) ------------------------------------------------------------
class CFGDenoiserParams:  # L45-70
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class CFGDenoisedParams:  # L72-85
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step, self.total_sampling_steps, self.inner_model = (
            x, sampling_step, total_sampling_steps, inner_model)


def _make_callbacks_module(callbacks_take_names: bool = True) -> types.ModuleType:
    m = types.ModuleType("modules.script_callbacks")
    m.callbacks_take_names = callbacks_take_names  # A1111 >= 1.9
    m.callback_map = {"callbacks_cfg_denoiser": [], "callbacks_cfg_denoised": []}  # L219-244
    Callback = namedtuple("ScriptCallback", ["script", "callback", "name"])  # L121-124

    def add(category):
        def register(fn, *, name=None):  # L523-536: appended to a global list
            m.callback_map[f"callbacks_{category}"].append(Callback("memsafe", fn, name))

        def register_before_1_9(fn):  # v1.8.0 script_callbacks.py L421-434: the callback only
            register(fn)

        return register if m.callbacks_take_names else register_before_1_9

    def remove_callbacks_for_function(fn):  # L447-453
        for callbacks in m.callback_map.values():
            callbacks[:] = [c for c in callbacks if c.callback != fn]

    def call(category):
        def run(params):  # L330-352: each callback in try/except that only reports
            for c in list(m.callback_map[f"callbacks_{category}"]):
                try:
                    c.callback(params)
                except Exception as e:  # noqa: BLE001
                    m.errors.append(e)
        return run

    m.errors = []
    m.params_name_the_denoiser = True  # A1111 >= 1.8
    m.on_cfg_denoiser, m.on_cfg_denoised = add("cfg_denoiser"), add("cfg_denoised")
    m.cfg_denoiser_callback, m.cfg_denoised_callback = call("cfg_denoiser"), call("cfg_denoised")
    m.remove_callbacks_for_function = remove_callbacks_for_function
    m.CFGDenoiserParams, m.CFGDenoisedParams = CFGDenoiserParams, CFGDenoisedParams
    return m


# -- the model, as A1111 holds it (sd_models.py; ldm LatentDiffusion) -------------------------------------------
class StandInSDModel(nn.Module):
    """``shared.sd_model``: ``alphas_cumprod`` and ``apply_model(x, t, cond)`` with A1111's condition dict
    (cfg_denoiser.py L213-222: ``{"c_crossattn": [c], "c_concat": [image_cond]}``); flags of sd_models.py L380."""

    def __init__(self, unet: nn.Module, fail_with_nan: bool = False) -> None:
        super().__init__()
        self.unet = unet
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod())
        self.parameterization = "eps"
        self.is_sdxl = self.is_sd2 = False
        self.is_sd1 = True
        self.model = types.SimpleNamespace(conditioning_key="crossattn", diffusion_model=unet)
        self.fail_with_nan = fail_with_nan
        self.calls = 0

    def apply_model(self, x, t, cond):
        self.calls += 1
        if self.is_sdxl:  # sd_models_xl.py: {"crossattn", "vector", "c_concat"}; the vector shifts the output here
            assert cond["vector"].shape[0] == x.shape[0]
            out = self.unet(x, t, encoder_hidden_states=cond["crossattn"]).sample
            out = out + 0.01 * cond["vector"].mean(1).view(-1, 1, 1, 1)
            return out * math.nan if self.fail_with_nan else out
        out = self.unet(x, t, encoder_hidden_states=torch.cat(cond["c_crossattn"])).sample
        return out * math.nan if self.fail_with_nan else out


class _LdmCheckpointFunction(torch.autograd.Function):
    """ldm's CheckpointFunction (ldm/modules/diffusionmodules/util.py), restated: the forward runs the block under
    no_grad; the backward recomputes it and differentiates its inputs AND its weights (``allow_unused`` only
    forgives weights the output does not use, not weights that do not require grad)."""

    @staticmethod
    def forward(ctx, run, n_inputs, *args):
        ctx.run, ctx.inputs, ctx.params = run, args[:n_inputs], args[n_inputs:]
        with torch.no_grad():
            return run(*ctx.inputs)

    @staticmethod
    def backward(ctx, *grads):
        inputs = [x.detach().requires_grad_(True) for x in ctx.inputs]
        with torch.enable_grad():
            out = ctx.run(*inputs)
        return (None, None, *torch.autograd.grad(out, inputs + list(ctx.params), grads, allow_unused=True))


class LdmCheckpointedUNet(nn.Module):
    """A UNet as A1111 before 1.10 builds it (``use_checkpoint: True`` in v1-inference.yaml): each block runs through
    ldm's ``checkpoint(func, inputs, params, flag)``; here the whole UNet is one such block, with ldm's two flag
    names (ResBlock ``use_checkpoint``, BasicTransformerBlock ``checkpoint``) on it and on an inner part."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet, self.use_checkpoint = unet, True
        self.inner = nn.Module()
        self.inner.checkpoint = True

    def forward(self, x, t, encoder_hidden_states):
        if not (self.use_checkpoint and self.inner.checkpoint):
            return self.unet(x, t, encoder_hidden_states=encoder_hidden_states)
        def block(x, context):
            return self.unet(x, t, encoder_hidden_states=context).sample

        sample = _LdmCheckpointFunction.apply(block, 2, x, encoder_hidden_states, *self.unet.parameters())
        return types.SimpleNamespace(sample=sample)


# -- samplers (sd_samplers_cfg_denoiser.py, sd_samplers_kdiffusion.py, sd_samplers_timesteps.py) ---------------
class StandInCFGDenoiser(nn.Module):
    """CFGDenoiser.forward (cfg_denoiser.py L155-311) reduced to what MemSafe relies on: conds reconstructed at
    ``self.step``, x repeated per AND part, the cfg_denoiser callback (with ``denoiser=self``), one batched model
    call, the cfg_denoised callback on ``x_out``, then the combine of L81-89."""

    def __init__(self, sampler, model_wrap):
        super().__init__()
        self.sampler, self.step, self.p = sampler, 0, None
        self.model_wrap = model_wrap  # the model it calls, through ``inner_model`` (kdiffusion.py L52-64)

    @property
    def inner_model(self):
        return self.model_wrap

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        cb = sys.modules["modules.script_callbacks"]
        state = sys.modules["modules.shared"].state
        if state.interrupted or state.skipped:
            raise InterruptedException
        conds_list, tensor = reconstruct_multicond_batch(cond, self.step)
        uncond = reconstruct_cond_batch(uncond, self.step)
        repeats = [len(c) for c in conds_list]
        x_in = torch.cat([x[i].expand(n, *x.shape[1:]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([sigma[i].expand(n) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([image_cond[i].expand(n, *image_cond.shape[1:]) for i, n in enumerate(repeats)]
                                  + [image_cond])
        # v1.7.0 L133 passes no denoiser, v1.8.0 L206 (and 1.10.1) passes self
        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, 0, 0, tensor, uncond,
                                   *([self] if cb.params_name_the_denoiser else []))
        if not cb.params_name_the_denoiser:
            del params.denoiser  # v1.6.0 script_callbacks.py L43-64: the class has no such field
        cb.cfg_denoiser_callback(params)
        if isinstance(params.text_cond, dict):  # L219-220 and catenate_conds L11-15 (SDXL)
            cond_in = {k: torch.cat([params.text_cond[k], params.text_uncond[k]]) for k in params.text_cond}
            cond = {**cond_in, "c_concat": [params.image_cond]}
        else:
            cond = {"c_crossattn": [torch.cat([params.text_cond, params.text_uncond])], "c_concat": [params.image_cond]}
        x_out = self.inner_model(params.x, params.sigma, cond=cond)  # L249
        cb.cfg_denoised_callback(CFGDenoisedParams(x_out, 0, 0, self.inner_model))
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = denoised_uncond.clone()
        for i, conds in enumerate(conds_list):
            for row, weight in conds:
                denoised[i] += (x_out[row] - denoised_uncond[i]) * (weight * cond_scale)
        self.step += 1
        return denoised


class InterruptedException(BaseException):  # sd_samplers_common.py L142
    pass


class StandInKDiffusionSampler:
    """KDiffusionSampler (sd_samplers_kdiffusion.py): model_wrap = CompVisDenoiser(sd_model) (L60-72),
    get_sigmas (L79-148; 'Automatic' schedule = model_wrap.get_sigmas), sample (L187-236)."""

    def __init__(self, funcname, sd_model, sgm=False):
        self.func = getattr(K.sampling, funcname)
        self.model_wrap_cfg = StandInCFGDenoiser(self, K.external.CompVisDenoiser(sd_model))
        self.model_wrap = self.model_wrap_cfg.inner_model  # L76-77: the same object
        self.sgm = sgm
        self.started_from = None

    def get_sigmas(self, p, steps):
        return self.model_wrap.get_sigmas(steps).cpu()

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        sigmas = self.get_sigmas(p, steps or p.steps)
        x = x * (torch.sqrt(1.0 + sigmas[0] ** 2.0) if self.sgm else sigmas[0])  # L191-195
        self.started_from = x.clone()
        self.model_wrap_cfg.p, self.model_wrap_cfg.step = p, 0  # sd_samplers_common.py L287-291
        extra = {"cond": conditioning, "image_cond": image_conditioning, "uncond": unconditional_conditioning,
                 "cond_scale": p.cfg_scale}
        torch.manual_seed(0)  # ancestral noise (A1111 draws it from p.rng through TorchHijack)
        try:
            return self.func(self.model_wrap_cfg, x, sigmas, extra_args=extra, disable=True)
        except InterruptedException:  # sd_samplers_common.py L280-281
            return x


class StandInTimestepsDenoiser(nn.Module):  # sd_samplers_timesteps.py L25-31: eps from apply_model
    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class StandInDDIMSampler:
    """CompVisSampler (sd_samplers_timesteps.py L76-167) with the ddim loop of sd_samplers_timesteps_impl.py
    (eta 0): timesteps = range(0, 1000, 1000 // steps) + 1, visited from the last."""

    sets_model_wrap = True  # v1.8.0 L83; before, only the CFG denoiser holds the model (v1.6.0 L66-82); install()

    def __init__(self, sd_model):
        self.model_wrap_cfg = StandInCFGDenoiser(self, StandInTimestepsDenoiser(sd_model))
        if self.sets_model_wrap:
            self.model_wrap = self.model_wrap_cfg.inner_model
        self.started_from = None

    def get_timesteps(self, p, steps):  # L92-101
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        timesteps = self.get_timesteps(p, steps or p.steps)
        self.started_from = x.clone()
        self.model_wrap_cfg.p, self.model_wrap_cfg.step = p, 0
        alphas = self.model_wrap_cfg.inner_model.inner_model.alphas_cumprod
        a = alphas[timesteps]
        a_prev = alphas[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))]
        s_in = x.new_ones(x.shape[0])
        for i in range(len(timesteps) - 1):
            index = len(timesteps) - 1 - i
            try:
                e_t = self.model_wrap_cfg(x, timesteps[index].item() * s_in, unconditional_conditioning,
                                          conditioning, p.cfg_scale, 0.0, image_conditioning)
            except InterruptedException:
                return x
            pred_x0 = (x - (1 - a[index]).sqrt() * e_t) / a[index].sqrt()
            x = a_prev[index].sqrt() * pred_x0 + (1 - a_prev[index]).sqrt() * e_t
        return x


# -- processing (processing.py) ----------------------------------------------------------------------------------
class StandInImageRNG:
    """rng.ImageRNG (rng.py L99-160): per-seed generators; first next() gives the seeds' noise, later calls fresh
    noise for ancestral samplers (the ``subseed`` settings are left out)."""

    def __init__(self, shape, seeds, **_):
        self.shape, self.seeds = tuple(shape), seeds
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.calls = 0

    def next(self):
        self.calls += 1
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])


class Processed:  # processing.py L516-568: what the job returns (comments captured at construction, L525)
    def __init__(self, p, images, infotexts):
        self.images, self.infotexts = images, infotexts
        self.comments = "".join(f"{c}\n" for c in p.comments)
        self.extra_generation_params = p.extra_generation_params


class StandInTxt2Img:
    """StableDiffusionProcessingTxt2Img: the fields MemSafe reads (processing.py L150-260, L1166-1310) and its
    sample() (L1307-1347, hires pass L1359-1463 reduced to: new RNG, the hook with is_hr_pass, a few steps)."""

    def __init__(self, sd_model, prompt="a red circle", negative_prompt="", seed=1, batch_size=1, n_iter=1,
                 steps=6, cfg_scale=7.0, sampler_name="sample_euler", enable_hr=False, width=64, height=64):
        self.sd_model, self.prompt, self.negative_prompt = sd_model, prompt, negative_prompt
        self.seed, self.batch_size, self.n_iter, self.steps, self.cfg_scale = seed, batch_size, n_iter, steps, cfg_scale
        self.sampler_name, self.enable_hr, self.width, self.height = sampler_name, enable_hr, width, height
        self.extra_generation_params: dict[str, Any] = {}
        self.comments: list[str] = []
        self.sd_model_hash = "standin0"
        self.extra_network_data: dict[str, Any] = {}
        self.is_hr_pass = False
        self.scripts = None
        self.script_args: tuple = ()
        self.sampler = None
        self.closed = False
        self.hr_noise = None
        self.hr_noise_before_hook = None

    def close(self):  # L404-410
        self.closed = True
        self.sampler = None

    def txt2img_image_conditioning(self, x, width=None, height=None):  # L100-130: zeros for plain SD
        return x.new_zeros(x.shape[0], 5, 1, 1)

    def create_sampler(self):
        if self.sampler_name == "ddim":
            return StandInDDIMSampler(self.sd_model)
        return StandInKDiffusionSampler(self.sampler_name, self.sd_model,
                                        sgm=sys.modules["modules.shared"].opts.sgm_noise_multiplier)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = self.create_sampler()
        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning,
                                      image_conditioning=self.txt2img_image_conditioning(x))
        if not self.enable_hr:
            return samples
        self.is_hr_pass = True  # L1368
        self.sampler = self.create_sampler()
        self.rng = StandInImageRNG(samples.shape[1:], [s + 1000 for s in self.seeds])  # L1425
        noise = self.rng.next()
        self.hr_noise_before_hook = noise.clone()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=conditioning,
                                                       uc=unconditional_conditioning)
        self.hr_noise = noise.clone()
        samples = self.sampler.sample(self, samples * 0.5 + noise * 0.5, conditioning, unconditional_conditioning,
                                      steps=3, image_conditioning=self.txt2img_image_conditioning(samples))
        self.is_hr_pass = False
        return samples


class ScriptRunner:
    """scripts.ScriptRunner for one always-on script: every hook in try/except that only logs (scripts.py
    L820-884), with the script's slice of ``p.script_args``."""

    def __init__(self, script, has_sampling_hook=True):
        self.script, self.has_sampling_hook, self.errors = script, has_sampling_hook, []

    def _call(self, name, p, *args, **kwargs):
        try:
            getattr(self.script, name)(p, *p.script_args, **kwargs) if not args else \
                getattr(self.script, name)(p, *args, *p.script_args, **kwargs)
        except Exception as e:  # noqa: BLE001
            self.errors.append(e)

    def process(self, p):
        self._call("process", p)

    def process_batch(self, p, **kwargs):
        self._call("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        if self.has_sampling_hook:  # A1111 >= 1.10 only (processing.py L1338)
            self._call("process_before_every_sampling", p, **kwargs)

    def postprocess_batch(self, p, **kwargs):
        self._call("postprocess_batch", p, **kwargs)

    def postprocess_image(self, p, pp):
        self._call("postprocess_image", p, pp)

    def postprocess(self, p, processed):
        self._call("postprocess", p, processed)


def process_images(p):
    """process_images_inner (processing.py L863-1148) reduced: process -> per batch: ImageRNG, process_batch,
    setup_conds, p.sample under no_grad, per-image infotext -> Processed -> postprocess."""
    shared, processing = sys.modules["modules.shared"], sys.modules["modules.processing"]
    p.all_prompts = [p.prompt] * (p.batch_size * p.n_iter) if isinstance(p.prompt, str) else list(p.prompt)
    p.all_seeds = [p.seed + i for i in range(len(p.all_prompts))] if isinstance(p.seed, int) else list(p.seed)
    if p.scripts is not None:
        p.scripts.process(p)
    images, infotexts = [], []
    forge = getattr(p, "forge", False)  # Forge: the job under inference_mode, forge_objects reset per batch
    with torch.inference_mode() if forge else torch.no_grad():  # Forge processing.py L911
        for n in range(p.n_iter):
            p.iteration = n
            if shared.state.skipped:
                shared.state.skipped = False
            if shared.state.interrupted:
                break
            if forge:  # Forge processing.py L937
                p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            p.prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size:(n + 1) * p.batch_size]
            p.rng = StandInImageRNG((4, p.height // 8, p.width // 8), p.seeds)
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds)
            p.c = multicond_learned_conditioning(p.prompts, p.steps)
            p.uc = learned_conditioning([p.negative_prompt] * len(p.prompts), p.steps)
            samples = p.sample(p.c, p.uc, p.seeds, None, 0.0, p.prompts)
            if p.scripts is not None:
                p.scripts.postprocess_batch(p, images=samples, batch_number=n)  # L1017
            for i in range(samples.shape[0]):
                p.batch_index = i  # L1032
                if p.scripts is not None:
                    p.scripts.postprocess_image(p, types.SimpleNamespace(image=samples[i]))  # L1050
                images.append(samples[i])
                # L1026-1027, L1087: this batch's prompts and seeds, the index within the batch
                infotexts.append(processing.create_infotext(p, p.prompts, p.seeds, index=i))
    processed = Processed(p, images, infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed


def create_infotext(p, all_prompts, all_seeds, all_subseeds=None, comments=None, iteration=0, position_in_batch=0,
                    use_main_prompt=False, index=None, all_negative_prompts=None):
    """processing.py L705-812 reduced: ``index`` points into ``all_seeds``, which is the batch's seeds when called
    from the sampling loop and the job's (``p.all_seeds``) from ``Processed.infotext`` (L609-610); extra_generation_params
    values may be lists (indexed the same way) or callables, called with the function's locals."""
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    generation_params = {"Seed": all_seeds[index], **p.extra_generation_params}
    for key, value in generation_params.items():
        if isinstance(value, list):
            generation_params[key] = value[index]
        elif callable(value):
            generation_params[key] = value(**locals())
    return ", ".join(f"{k}: {v}" for k, v in generation_params.items() if v is not None)


def create_infotext_before_1_9(p, all_prompts, all_seeds, all_subseeds=None, comments=None, iteration=0,
                               position_in_batch=0, use_main_prompt=False, index=None, all_negative_prompts=None):
    """create_infotext of A1111 1.6-1.8 (v1.8.0 processing.py L705-751) reduced: every extra_generation_params
    value is written as it is, a list or a callable too (through str(); quote() only adds JSON quotes)."""
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    generation_params = {"Seed": all_seeds[index], **p.extra_generation_params}
    return ", ".join(f"{k}: {v}" for k, v in generation_params.items() if v is not None)


def run_job(p):
    """txt2img.py L79-83 / api.py L468: ``with closing(p): process_images(p)``."""
    with closing(p):
        return process_images(p)


# -- install ----------------------------------------------------------------------------------------------------
class Opts(types.SimpleNamespace):  # shared.opts: the options MemSafe reads (shared_options.py L176, L242, L401)
    pass


def install(sd_model, *, has_sampling_hook=True, infotext_callables=True, callbacks_take_names=True,
            callbacks_name_the_denoiser=True, timesteps_samplers_set_model_wrap=True, **opts):
    """Put a fresh ``modules`` package into sys.modules; returns it. ``has_sampling_hook=False``: A1111 1.6-1.9;
    with ``infotext_callables=False, callbacks_take_names=False`` too: 1.6-1.8 (no per-image infotext values,
    ``on_cfg_denoiser(callback)`` without ``name=``); with ``callbacks_name_the_denoiser=False`` too: 1.6-1.7 (the
    cfg_denoiser callback does not say whose call it is; with ``timesteps_samplers_set_model_wrap=False``, DDIM and
    the like have no ``sampler.model_wrap``)."""
    uninstall()
    StandInDDIMSampler.sets_model_wrap = timesteps_samplers_set_model_wrap
    modules = types.ModuleType("modules")
    modules.__path__ = []
    shared = types.ModuleType("modules.shared")
    shared.opts = Opts(batch_cond_uncond=True, sgm_noise_multiplier=False, memsafe_cache_size=64, **opts)
    shared.state = types.SimpleNamespace(interrupted=False, skipped=False, textinfo="", sampling_step=0,
                                         sampling_steps=0)  # shared_state.py
    shared.sd_model = sd_model
    prompt_parser = types.ModuleType("modules.prompt_parser")
    prompt_parser.reconstruct_cond_batch = reconstruct_cond_batch
    prompt_parser.reconstruct_multicond_batch = reconstruct_multicond_batch
    scripts = types.ModuleType("modules.scripts")
    base = {"elem_id": lambda self, item: f"script_memsafe_{item}"}  # scripts.py L334-341
    if has_sampling_hook:  # scripts.py L190: exists from 1.10 on
        base["process_before_every_sampling"] = lambda self, p, *a, **k: None
    scripts.Script = type("Script", (), base)
    scripts.AlwaysVisible = object()  # scripts.py L13
    callbacks = _make_callbacks_module(callbacks_take_names)
    callbacks.params_name_the_denoiser = callbacks_name_the_denoiser
    callbacks.startup = []
    for hook in ("on_ui_settings", "on_before_ui", "on_app_started"):  # script_callbacks.py L456-591
        setattr(callbacks, hook, lambda fn, *, name=None, _hook=hook: callbacks.startup.append((_hook, fn)))
    processing = types.ModuleType("modules.processing")
    processing.StableDiffusionProcessingTxt2Img = StandInTxt2Img  # processing.py L1166
    processing.create_infotext = create_infotext if infotext_callables else create_infotext_before_1_9
    for name, module in (("shared", shared), ("prompt_parser", prompt_parser), ("scripts", scripts),
                         ("script_callbacks", callbacks), ("processing", processing)):
        setattr(modules, name, module)
        sys.modules[f"modules.{name}"] = module
    sys.modules["modules"] = modules
    return modules


def uninstall():
    StandInDDIMSampler.sets_model_wrap = True
    for name in [n for n in sys.modules if n == "modules" or n.startswith("modules.")]:
        del sys.modules[name]
    sys.modules.pop("memsafe_script_under_test", None)


def load_script():
    """scripts/memsafe.py loaded the way the WebUI loads script files (script_loading.py: by path), with a
    stand-in gradio whose components are mocks (the UI layout itself is checked in a real WebUI)."""
    import importlib.util
    import os
    from unittest import mock

    gradio = mock.MagicMock(name="gradio")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "memsafe.py")
    with mock.patch.dict(sys.modules, {"gradio": gradio}):
        spec = importlib.util.spec_from_file_location("memsafe_script_under_test", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module
