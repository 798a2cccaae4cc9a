"""AUTOMATIC1111 WebUI adapter: everything the MemSafe script does, on the processing object ``p``.

Facts about the host (file:line in A1111 v1.10.1) are in docs; the essentials:
- ``processing.py`` L1336-1346: ``x = self.rng.next()`` -> ``scripts.process_before_every_sampling(p, x=x, noise=x,
  c=..., uc=...)`` -> ``self.sampler.sample(self, x, ...)``. We replace the noise IN PLACE (``noise.copy_``); the
  hook's return value is ignored. Before 1.10 (no such hook) ``p.rng`` is wrapped in a one-shot proxy in
  ``process_batch`` instead. The hires pass (``p.is_hr_pass``) is never touched.
- ``scripts.py`` L836-842: every script hook is wrapped in try/except that only logs, so failing closed means
  making the SAMPLER raise (``p.sampler.sample`` replaced on that one sampler object), not raising in the hook.
- ``sd_samplers_cfg_denoiser.py`` L198-311: the CFG denoiser; ``cfg_denoiser`` callbacks see sigma and the
  denoiser object, ``cfg_denoised`` callbacks see ``x_out`` before the CFG combine (edited in place: the
  unconditional-only first steps of the batch-wise method).

Forge (WebUI Forge ``main``, an A1111 1.10 fork with its own backend) runs the same code; where it differs (the
noise through ``p.modified_noise``, its UNet call, a post-CFG function instead of the cfg_denoised callback,
forward-only per-sample) the Forge parts are in ``forge.py``.

All state of a job lives on ``p`` (attribute ``memsafe_job``); callbacks are registered per job and removed in
``postprocess`` and, on any error, in ``p.close()`` (called by ``with closing(p)`` in txt2img.py L79 and
api.py L468). Host modules are imported inside functions only.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import methods
from ..config import MitigationConfig
from ..errors import ConfigError, Interrupted, NotApplicableError
from ..guidance import DenoiserCall, Guidance, guidance_from_denoiser, guidance_from_eps_model, select_rows
from . import forge
from .forge import is_forge
from .webui_args import FIELD_ORDER, ScriptRequest, parse_script_args

log = logging.getLogger("memsafe")

JOB_ATTR = "memsafe_job"
XYZ_FIELDS = ("enabled", "method", *FIELD_ORDER)  # p.memsafe_<name>, set by the XYZ-plot axes
FAIL_STOP = "Stop the job"
FAIL_CONTINUE = "Continue unmitigated (infotext says so)"
MAX_CACHE_SIZE = 1024  # the settings slider's maximum
VERIFY_RTOL = 1e-2  # a cache hit is used only if the risk at the same noise still agrees this closely


class MemSafeError(RuntimeError):
    """Mitigation was requested and could not be applied; the job stops (fail closed)."""


# -- settings ----------------------------------------------------------------------------------------------------
def _opt(name: str, default: Any) -> Any:
    from modules import shared

    return getattr(shared.opts, name, default)


FAIL_POLICIES = (FAIL_STOP, FAIL_CONTINUE)


def fail_policy() -> str:
    """Settings > MemSafe > what a failed mitigation does: FAIL_STOP or FAIL_CONTINUE; any other value (the options
    API stores anything) counts as FAIL_STOP, fail closed, and :func:`check_settings` reports it."""
    value = _opt("memsafe_fail_policy", FAIL_STOP)
    return value if value in FAIL_POLICIES else FAIL_STOP


def _check_fail_policy() -> None:
    value = _opt("memsafe_fail_policy", FAIL_STOP)
    if value not in FAIL_POLICIES:
        raise _bad_setting("memsafe_fail_policy", value, "one of " + ", ".join(repr(v) for v in FAIL_POLICIES))


def _bad_setting(name: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"setting {name}", f"{value!r} is not {allowed} (Settings > MemSafe)")


def _number_setting(name: str, allowed: str, integer: bool, default: float = 0.0,
                    maximum: float = math.inf) -> float:
    """A setting that holds a number in [0, ``maximum``] (a whole one if ``integer``); unset or empty: ``default``."""
    value = _opt(name, default)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or not 0 <= number <= maximum \
            or (integer and number != int(number)):
        raise _bad_setting(name, value, allowed)
    return number


def checkpointing_setting() -> str:
    """Settings > MemSafe > activation checkpointing: one of methods.CHECKPOINTING (else a ConfigError naming the
    setting); ``never`` under ``--lowvram``, whose per-block device hooks would not run when a block is recomputed."""
    from modules import shared

    value = _opt("memsafe_checkpointing", "on_oom")
    if value not in methods.CHECKPOINTING:
        raise _bad_setting("memsafe_checkpointing", value, f"one of {', '.join(methods.CHECKPOINTING)}")
    if getattr(getattr(shared, "cmd_opts", None), "lowvram", False):
        return "never"
    return value


def memory_budget() -> int | None:
    """Settings > MemSafe > checkpointing budget (MiB) as bytes: None (0: from the free VRAM at the time) or a
    positive byte count; anything but a finite number >= 0 is a ConfigError naming the setting."""
    value = _number_setting("memsafe_memory_budget_mb", "a number of MiB >= 0 (0: 3/4 of the free VRAM)",
                            integer=False)
    return int(value * 2**20) if value > 0 else None


def images_per_call() -> int | None:
    """Settings > MemSafe > images per UNet call for per-sample's model calls: None (0: the whole batch) or a
    positive count; anything but a whole number >= 0 is a ConfigError naming the setting."""
    value = _number_setting("memsafe_images_per_call", "a whole number >= 0 (0: the whole batch)", integer=True)
    return int(value) or None


def cache_size() -> int:
    """Settings > MemSafe > adjusted-noise cache (images; 0: off); a ConfigError unless a whole number in
    0..:data:`MAX_CACHE_SIZE` (the cache's memory stays bounded)."""
    return int(_number_setting("memsafe_cache_size", f"a whole number of images from 0 (off) to {MAX_CACHE_SIZE}",
                               integer=True, default=64, maximum=MAX_CACHE_SIZE))


def check_settings() -> None:
    """The per-sample settings (read again when it runs) are valid, or a ConfigError naming the first one that
    is not (and its allowed values): checked when a job starts, with the cache size that :func:`start_job`
    applies, so a bad value (the options API stores anything) stops the job up front instead of being silently
    replaced by a default."""
    _check_fail_policy()
    checkpointing_setting()
    memory_budget()
    images_per_call()


def unet_of(sd_model: Any) -> torch.nn.Module | None:
    """The UNet the guidance runs (its weights are frozen while per-sample adjusts, and it may be checkpointed):
    A1111's ``sd_model.model.diffusion_model`` (ldm DiffusionWrapper); None where it cannot be found. Forge needs
    none: its per-sample is forward-only."""
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    return unet if isinstance(unet, torch.nn.Module) else None


LDM_CHECKPOINT_FLAGS = ("use_checkpoint", "checkpoint")  # ldm/sgm ResBlock, AttentionBlock / BasicTransformerBlock


@contextmanager
def ldm_checkpointing_off(unet: torch.nn.Module | None) -> Iterator[None]:
    """Inside the ``with``, the UNet's blocks run without ldm's (and sgm's) own gradient checkpointing; on exit, also
    on error, the flags that were on are on again. A1111 before 1.10 builds every UNet with it on (``use_checkpoint:
    True`` in v1-inference.yaml and sd_xl_base.yaml; 1.10 turns it off at load, sd_models.py L618-624). Its
    backward differentiates each block's weights as well, which fails once MemSafe has frozen them ("One of the
    differentiated Tensors does not require grad"), and it would recompute every block whatever MemSafe's
    checkpointing setting says. The forward pass computes the same numbers either way (ldm diffusionmodules/util.py
    ``checkpoint``: the block's function, under no_grad when on). ldm's AttentionBlock ignores its flag (always
    checkpointed); SD1, SD2 and SDXL's UNets have none (they use SpatialTransformer)."""
    switched = []
    for module in unet.modules() if unet is not None else ():
        for flag in LDM_CHECKPOINT_FLAGS:
            if getattr(module, flag, None) is True:  # a bool attribute only: never a method of that name
                setattr(module, flag, False)
                switched.append((module, flag))
    if switched:
        log.info("memsafe: ldm gradient checkpointing off in %d UNet blocks while adjusting", len(switched))
    try:
        yield
    finally:
        for module, flag in switched:
            setattr(module, flag, True)


# -- model family ------------------------------------------------------------------------------------------------
def model_family(sd_model: Any) -> str:
    """The preset family of a loaded model: sdxl, sd2-v, sd2 or sd1 (A1111's sd_models.py L380-395 flags, which
    Forge's diffusion engines set too; Forge says v-prediction through its UNet's predictor)."""
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        v = (getattr(sd_model, "parameterization", "eps") == "v"
             or (hasattr(sd_model, "forge_objects") and forge.prediction_type(sd_model) == "v_prediction"))
        return "sd2-v" if v else "sd2"
    return "sd1"


# -- the noise cache ---------------------------------------------------------------------------------------------
@dataclass
class CachedNoise:
    z: Tensor  # adjusted noise of one image, on the CPU
    risk: float  # ||eps_tilde|| at the original noise (verified on every hit)
    record: ImageRecord


class NoiseCache:
    """Bounded LRU of adjusted noise per image, keyed by everything that determines it. A hit is verified by
    re-evaluating the risk at the original noise (one model evaluation, which auto mode spends anyway), so a
    change the key cannot see (a ControlNet, a UNet hook) turns it into a miss instead of a wrong image."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, CachedNoise] = OrderedDict()

    def get(self, key: str) -> CachedNoise | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: str, item: CachedNoise) -> None:
        if self.capacity <= 0:
            return
        self._items[key] = item
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def resize(self, capacity: int) -> None:
        self.capacity = max(0, int(capacity))
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


def _digest(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=20)
    for part in parts:
        if isinstance(part, Tensor):
            t = part.detach().to("cpu").contiguous()
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.numpy().tobytes())
        elif isinstance(part, dict):
            for k in sorted(part):
                h.update(str(k).encode())
                h.update(_digest(part[k]).encode())
        elif isinstance(part, (list, tuple)):
            for item in part:
                h.update(_digest(item).encode())
        else:
            h.update(repr(part).encode())
        h.update(b"|")
    return h.hexdigest()


# -- per-image results and the job ----------------------------------------------------------------------------
@dataclass
class ImageRecord:
    """What happened to one image (one seed): the infotext and the API report it."""

    applied: str
    risk_before: float
    risk_after: float = math.nan
    iterations: int = 0
    limit: float = math.nan  # target (per-sample) or risk threshold (batch-wise/none)
    cached: bool = False
    out_of_distribution: bool = False  # AdjustResult.out_of_distribution(): the adjusted noise left Gaussian's RMS
    noise_rms: float = math.nan
    noise_rms_limit: float = math.nan  # AdjustResult.noise_rms_limit: the band at this latent size

    @property
    def at_risk(self) -> bool:
        return self.risk_after > self.limit  # NaN compares False

    def infotext(self) -> str:
        if self.applied == "interrupted":
            return "interrupted before mitigation finished"
        after = "" if math.isnan(self.risk_after) else f"->{self.risk_after:.4g}"
        parts = [self.applied, f"risk {self.risk_before:.4g}{after}"]
        if self.applied == "per_sample":
            parts.append(f"it {self.iterations}")
        if self.cached:
            parts.append("cached")
        return " ".join(parts)

    def warning(self) -> str | None:
        warnings = []
        if self.at_risk:
            what = "target" if self.applied == "per_sample" else "risk threshold"
            warnings.append(f"still at risk ({self.risk_after:.4g} > {what} {self.limit:.4g}) after {self.applied}")
        if self.out_of_distribution:
            low, high = 1 / self.noise_rms_limit, self.noise_rms_limit
            warnings.append(f"noise out of distribution after {self.applied} (RMS {self.noise_rms:.3f} where "
                            f"Gaussian noise has 1, allowed {low:.3f}-{high:.3f}): the image may be distorted or "
                            "off-prompt")
        return "; ".join(warnings) + ": change the prompt" if warnings else None


@dataclass
class SamplingContext:
    """What the CFG callbacks need for one batch's (first-pass) sampler."""

    denoiser: Any  # the sampler's CFG denoiser object: callbacks act only on calls from it
    schedule: Tensor  # levels in visiting order (sigmas, or timesteps first-used-first)
    uncond_steps: int
    uncond_images: Tensor  # [B] bool
    rows: list[list[tuple[int, float]]]  # per image: (cond row in x_out, weight), from reconstruct_multicond_batch
    k_diffusion: bool
    first_level: float
    measure: list[int] = field(default_factory=list)  # global image indexes whose risk_after comes from step 0
    reuse: DenoiserCall | None = None  # the latest evaluations, if the first step may be exactly that call again
    stand_in: ReuseFirstCall | None = None  # in the CFG denoiser's model_wrap until its first call
    seen_first: bool = False
    early: bool = False
    first: bool = False
    level: float = math.nan  # the noise level of the CFG call under way (its cfg_denoiser callback's sigma)
    whose_unknown: bool = False  # A1111 < 1.8: its cfg_denoiser callback does not say which denoiser calls


def infotext_calls_values() -> bool:
    """Whether this WebUI's ``create_infotext`` calls a callable ``extra_generation_params`` value with its locals
    to get one image's value (A1111 >= 1.9, processing.py L801-808). Before 1.9 it writes every value as it is (a
    callable as ``<bound method ...>``), so MemSafe then writes each image's text itself (``before_image``). Read
    from the function's code (``callable`` among the names it looks up), which needs no version string or source."""
    from modules import processing

    return "callable" in processing.create_infotext.__code__.co_names


def job_index(index: int, p: Any = None, all_seeds: Any = None, use_main_prompt: bool = False, **_: Any) -> int:
    """The position in the whole job of the image that ``create_infotext`` describes. Its ``index`` points into
    its ``all_seeds``: the current batch's seeds (``p.seeds``) while images are made (processing.py L1026-1027,
    so the position within the batch of iteration ``p.iteration``), the job's (``p.all_seeds``) from
    ``Processed.infotext`` (L609-610); ``use_main_prompt`` (the grid, L1123) means the job's first image."""
    if use_main_prompt:
        return 0
    if p is not None and all_seeds is not None and all_seeds is not getattr(p, "all_seeds", None):
        return int(getattr(p, "iteration", 0)) * int(p.batch_size) + index
    return index


class Job:
    """The state of one MemSafe-enabled txt2img job (stored on ``p``)."""

    def __init__(self, request: ScriptRequest, config: MitigationConfig, cache: NoiseCache, family: str) -> None:
        self.request = request
        self.config = config
        self.cache = cache
        self.family = family
        self.records: dict[int, ImageRecord] = {}
        self.error: str | None = None
        self.skipped_reason: str | None = None  # fail policy "continue": why nothing was applied
        self.sampling: SamplingContext | None = None
        self.infotext_callables = True  # infotext_calls_values() of this WebUI, set when attached to p
        self.forge = False  # is_forge(), set when attached to p
        self._callbacks: list[Callable[..., None]] = []
        self._cleanups: list[Callable[[], None]] = []  # Forge: put the job's UnetPatcher back

    # infotext values (create_infotext calls them with its locals: p, index, all_seeds, ...; processing.py L801-808)
    def result_text(self, index: int = 0, **infotext_locals: Any) -> str | None:
        if self.skipped_reason is not None:
            return f"NOT APPLIED ({self.skipped_reason})"
        record = self.records.get(job_index(index, **infotext_locals))
        return record.infotext() if record else None

    def warning_text(self, index: int = 0, **infotext_locals: Any) -> str | None:
        record = self.records.get(job_index(index, **infotext_locals))
        return record.warning() if record else None

    def total_images(self, p: Any) -> int:
        return len(getattr(p, "all_seeds", []) or []) or p.n_iter * p.batch_size

    # -- callbacks: registered per job, removed at its end (also on error), inert for any other sampler --
    def install_callbacks(self) -> None:
        if self._callbacks:
            return
        from modules import script_callbacks

        for register, fn in ((script_callbacks.on_cfg_denoiser, self._on_cfg_denoiser),
                             (script_callbacks.on_cfg_denoised, self._on_cfg_denoised)):
            # a name shows in Settings > Callbacks from A1111 1.9 on; before, register(callback) takes no other
            if "name" in inspect.signature(register).parameters:
                register(fn, name="memsafe_job")
            else:
                register(fn)
            self._callbacks.append(fn)

    def remove_callbacks(self) -> None:
        if not self._callbacks:
            return
        from modules import script_callbacks

        for fn in self._callbacks:
            script_callbacks.remove_callbacks_for_function(fn)
        self._callbacks = []

    @property
    def has_callbacks(self) -> bool:
        return bool(self._callbacks)

    def _on_cfg_denoiser(self, params: Any) -> None:
        ctx = self.sampling
        if ctx is None:
            return
        ctx.level = float(params.sigma[0])
        if not hasattr(params, "denoiser"):  # A1111 1.6-1.7 (1.8 added it, cfg_denoiser.py L235 in 1.10.1)
            ctx.whose_unknown = True  # the cfg_denoised callback of this call tells, by its inner_model
            return
        denoiser = params.denoiser
        _classify_call(ctx, denoiser is ctx.denoiser)
        if ctx.first and ctx.reuse is not None and isinstance(getattr(denoiser, "model_wrap", None),
                                                              torch.nn.Module):
            ctx.stand_in = ReuseFirstCall(denoiser, ctx.reuse)
            ctx.reuse = None

    def _on_cfg_denoised(self, params: Any) -> None:
        ctx = self.sampling
        if ctx is None:
            return
        if ctx.whose_unknown:  # too late to reuse the first call; in time for what follows
            ctx.whose_unknown = False
            model = getattr(params, "inner_model", None)
            _classify_call(ctx, model is not None and model is getattr(ctx.denoiser, "model_wrap", None))
        if not (ctx.first or ctx.early):
            return
        x_out = params.x
        batch = len(ctx.rows)
        uncond_rows = x_out[-batch:]
        if ctx.first and ctx.measure:
            # step 0 evaluates cond and uncond at the adjusted noise: eps_cond - eps_uncond for free
            scale = 1.0 / ctx.first_level if ctx.k_diffusion else 1.0
            for i in range(batch):
                diff = torch.zeros_like(uncond_rows[i], dtype=torch.float32)
                for row, weight in ctx.rows[i]:
                    delta = (uncond_rows[i] - x_out[row]) if ctx.k_diffusion else (x_out[row] - uncond_rows[i])
                    diff += delta.float() * (weight * scale)
                global_index = ctx.measure[i] if i < len(ctx.measure) else None
                if global_index is not None and global_index in self.records:
                    self.records[global_index].risk_after = float(diff.norm())
            ctx.first = False
        if ctx.early:
            # unconditional prediction only: every cond row of an affected image becomes its uncond row, so the
            # CFG combine (cfg_denoiser.py L81-89) yields exactly the uncond prediction
            for i in range(batch):
                if bool(ctx.uncond_images[i]):
                    for row, _ in ctx.rows[i]:
                        x_out[row] = uncond_rows[i]

    def add_cleanup(self, cleanup: Callable[[], None]) -> None:
        self._cleanups.append(cleanup)

    def forge_post_cfg(self, args: dict[str, Any]) -> Tensor:
        """Forge's post-CFG function for this batch's sampler (forge.install_post_cfg; Forge never calls the
        cfg_denoised callbacks): at the first step, the risk at the adjusted noise from its cond and uncond
        predictions (``eps_c - eps_u = (D_u - D_c) / sigma``; Forge's ``cond_denoised`` is the weighted mean of an
        image's AND parts, so times their total weight, as its CFG combine does, sampling_function.py L309-312);
        during the unconditional-only first steps, the uncond prediction of the affected images."""
        denoised = args["denoised"]
        ctx = self.sampling
        if ctx is None:
            return denoised
        ctx.level = float(args["sigma"][0])
        _classify_call(ctx, True)  # only this batch's first-pass sampler has the function (forge.py)
        uncond, cond = args["uncond_denoised"], args["cond_denoised"]
        if ctx.first and ctx.measure:
            for i, global_index in enumerate(ctx.measure):
                if global_index in self.records:
                    weight = sum(w for _, w in ctx.rows[i])
                    risk = ((uncond[i] - cond[i]).float() * (weight / ctx.level)).norm()
                    self.records[global_index].risk_after = float(risk)
            ctx.first = False
        if ctx.early:
            mask = ctx.uncond_images.to(denoised.device).view(-1, *([1] * (denoised.dim() - 1)))
            denoised = torch.where(mask, uncond.to(denoised.dtype), denoised)
        return denoised

    def set_sampling(self, ctx: SamplingContext | None) -> None:
        """The next batch's sampling context; the last one's stand-in model (if its sampler never called it,
        e.g. after an interrupt) is taken out first."""
        if self.sampling is not None and self.sampling.stand_in is not None:
            self.sampling.stand_in.restore()
        self.sampling = ctx

    def finish(self) -> None:
        self.remove_callbacks()
        self.set_sampling(None)
        while self._cleanups:
            self._cleanups.pop()()


def _classify_call(ctx: SamplingContext, ours: bool) -> None:
    """Whether the CFG call under way is this batch's sampler's first, and one of its unconditional-only steps."""
    ctx.first = ours and not ctx.seen_first
    ctx.seen_first = ctx.seen_first or ours
    ctx.early = bool(ours and methods.uncond_only(ctx.level, ctx.schedule, ctx.uncond_steps))


class ReuseFirstCall(torch.nn.Module):
    """Takes the place of a CFG denoiser's ``model_wrap`` (what its ``inner_model`` returns, kdiffusion.py L52-64)
    for ONE call. A1111 has no hook that hands the sampler a precomputed model output, so this is how the latest
    evaluation of every image, made at exactly the noise, sigma and conditioning of the sampler's first step
    (auto mode's risk evaluation when it left the noise unchanged, the per-sample method's last check where it
    stopped), saves that step's model call: if the call's inputs equal the recorded call's (compared exactly), it
    returns a copy of its output (the same UNet call's numbers, or, where the images' last evaluations were calls
    of other sizes, the same up to batch-size round-off); otherwise it runs the model. Either way it puts the
    model back first."""

    def __init__(self, owner: Any, call: DenoiserCall) -> None:
        super().__init__()
        self.model = owner.model_wrap
        object.__setattr__(self, "_owner", owner)  # plain attributes: the owner holds this module, not vice versa
        object.__setattr__(self, "_call", call)
        owner.model_wrap = self

    def __getattr__(self, name: str) -> Any:
        """Everything else is the model's (another extension's callback may read ``inner_model.<attr>``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None:
                raise
            return getattr(model, name)

    def restore(self) -> None:
        if getattr(self._owner, "model_wrap", None) is self:
            self._owner.model_wrap = self.model

    def forward(self, x: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        self.restore()
        if self._call.matches(x, sigma, kwargs):
            log.debug("memsafe: the first sampling step took memsafe's last evaluation (one model call saved)")
            return self._call.denoised.clone()  # the sampler edits x_out in place (cfg_denoised callbacks)
        return self.model(x, sigma, **kwargs)


# -- reading the job's request from p ------------------------------------------------------------------------
def request_from(p: Any, args: Sequence[Any]) -> ScriptRequest:
    """The script's arguments with XYZ-plot overrides (``p.memsafe_<field>``) applied."""
    request = parse_script_args(args)
    xyz = {name: getattr(p, f"memsafe_{name}") for name in XYZ_FIELDS if hasattr(p, f"memsafe_{name}")}
    if not xyz:
        return request
    enabled = xyz.pop("enabled", request.enabled)
    if not parse_script_args([{"enabled": enabled}]).enabled:
        return parse_script_args([])
    method = xyz.pop("method", request.method)
    return parse_script_args([{"enabled": True, "method": method, "preset": request.preset, **request.overrides, **xyz}])


def _check_applicable(p: Any, config: MitigationConfig, on_forge: bool) -> None:
    if on_forge:
        forge.check_model(p.sd_model)
        forge.check_config(config)
    if not getattr(p, "cfg_scale", 7.0) > 1.0:
        raise NotApplicableError(
            f"memsafe: CFG scale {p.cfg_scale}: MemSafe needs classifier-free guidance (CFG scale > 1); raise it "
            "or disable MemSafe")
    if config.uses_uncond_steps and config.uncond_steps >= p.steps:
        raise ConfigError("uncond_steps", f"got {config.uncond_steps} with {p.steps} sampling steps; allowed: fewer "
                                          "than the number of steps")


def start_job(p: Any, args: Sequence[Any], cache: NoiseCache) -> Job | None:
    """``Script.process``: read the arguments, create the job on ``p``, write the infotext entries. Returns None
    when MemSafe is off (then nothing at all is touched). Errors are recorded on the job (fail closed later)."""
    from modules import shared

    try:
        request = request_from(p, args)
    except ConfigError as e:
        job = Job(parse_script_args([]), MitigationConfig(), cache, "sd1")
        _attach(p, job)
        job_failed(p, job, e)
        return job
    if not request.enabled:
        return None
    family = model_family(getattr(p, "sd_model", None) or shared.sd_model)
    job = Job(request, MitigationConfig(method="off"), cache, family)
    _attach(p, job)
    try:
        cache.resize(cache_size())
        check_settings()
        if job.forge:  # per-sample's gradient: forward-only unless chosen
            request = job.request = forge.forge_request(request)
        job.config = request.resolve(family)
        _check_applicable(p, job.config, job.forge)
    except (ConfigError, NotApplicableError) as e:
        job_failed(p, job, e)
        return job
    p.extra_generation_params["MemSafe"] = job.config.to_string()
    if request.preset != "custom":
        p.extra_generation_params["MemSafe preset"] = family if request.preset == "auto" else request.preset
    if job.infotext_callables:
        p.extra_generation_params["MemSafe result"] = job.result_text
        p.extra_generation_params["MemSafe warning"] = job.warning_text
    return job


def _attach(p: Any, job: Job) -> None:
    setattr(p, JOB_ATTR, job)
    job.infotext_callables = infotext_calls_values()
    job.forge = is_forge()
    original_close = p.close

    def close(*a: Any, **k: Any) -> Any:  # runs at the end of every job, also after an exception
        try:
            job.finish()
        except Exception:  # noqa: BLE001 - closing must always reach the WebUI's own close
            log.exception("memsafe: cleanup failed")
        return original_close(*a, **k)

    p.close = close


def job_failed(p: Any, job: Job, error: BaseException) -> None:
    """Fail closed (default: the job stops with ``error``), or with the "continue" policy: generate without
    mitigation and say so in the infotext."""
    message = str(error) if str(error).startswith("memsafe") else f"memsafe: {error}"
    job.finish()
    if fail_policy() == FAIL_CONTINUE:
        log.warning("%s; continuing unmitigated (setting memsafe_fail_policy)", message)
        job.skipped_reason = message.removeprefix("memsafe: ")
        p.extra_generation_params["MemSafe result"] = job.result_text if job.infotext_callables else job.result_text()
        return
    log.error("%s; the job is stopped (setting memsafe_fail_policy)", message)
    job.error = message
    p.extra_generation_params["MemSafe"] = f"FAILED: {message}"


def _refuse_sampling(sampler: Any, message: str) -> None:
    """Make this one sampler object raise instead of sampling (the hook's own exceptions are swallowed)."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise MemSafeError(f"{message} (no image was generated; MemSafe fails closed)")

    sampler.sample = refuse


# -- conditioning and guidance from p ---------------------------------------------------------------------------
def _make_condition_dict(sd_model: Any, crossattn: Any, image_cond: Tensor, uncond: bool) -> dict[str, Any]:
    """The ``cond`` mapping the CFG denoiser passes to the model (cfg_denoiser.py L213-222)."""
    if getattr(getattr(sd_model, "model", None), "conditioning_key", None) == "crossattn-adm":
        return {"c_crossattn": [crossattn], "c_adm": torch.zeros_like(image_cond) if uncond else image_cond}
    if isinstance(crossattn, dict):
        return {**crossattn, "c_concat": [image_cond]}
    return {"c_crossattn": [crossattn], "c_concat": [image_cond]}


@dataclass
class BatchGuidance:
    guidance: Guidance
    rows: list[list[tuple[int, float]]]
    schedule: Tensor
    first_level: float
    k_diffusion: bool
    key_parts: tuple[Any, ...]
    cond_rows: Any
    uncond_rows: Any
    image_cond: Tensor
    owner: Tensor


def sampler_model(sampler: Any) -> Any:
    """The model a sampler's CFG denoiser calls (k-diffusion's CompVisDenoiser, or CompVisTimestepsDenoiser):
    ``sampler.model_wrap``, which the timesteps samplers (DDIM, PLMS, UniPC) of A1111 1.6-1.7 do not set; there the
    CFG denoiser's ``inner_model`` makes and holds it (v1.7.0 sd_samplers_timesteps.py L66-82), the same object."""
    model = getattr(sampler, "model_wrap", None)
    return model if model is not None else sampler.model_wrap_cfg.inner_model


def guidance_for_batch(p: Any, x: Tensor, c: Any, uc: Any, on_forge: bool | None = None) -> BatchGuidance:
    """eps_tilde at the first-pass sampler's first noise level with the step-0 conditioning, as its CFG denoiser
    will evaluate it (sd_samplers_kdiffusion.py L187-236, sd_samplers_timesteps.py L141-167; Forge: forge.py).
    ``on_forge``: whether the WebUI is Forge (None: find out)."""
    from modules import prompt_parser, shared

    sampler = p.sampler
    sd_model = p.sd_model
    conds_list, cond_tensor = prompt_parser.reconstruct_multicond_batch(c, 0)
    uncond_tensor = prompt_parser.reconstruct_cond_batch(uc, 0)
    owner = torch.tensor([i for i, conds in enumerate(conds_list) for _ in conds], dtype=torch.long)
    weight = torch.tensor([w for conds in conds_list for _, w in conds], dtype=torch.float32)
    rows = [[(r, w) for r, w in conds] for conds in conds_list]
    image_cond = p.txt2img_image_conditioning(x)
    cond_image_cond = image_cond.index_select(0, owner.to(image_cond.device))
    batched = bool(getattr(shared.opts, "batch_cond_uncond", True))
    if on_forge is None:
        on_forge = is_forge()
    if on_forge:  # every Forge sampler's CFG denoiser calls a denoiser D(x, sigma) (forge.py)
        sigma0, sgm, levels = forge.levels(p)
        guidance = guidance_from_denoiser(forge.ForgeDenoiser(forge.prepare_unet(p, x)), sigma0,
                                          forge.denoiser_kwargs(cond_tensor, cond_image_cond, False),
                                          forge.denoiser_kwargs(uncond_tensor, image_cond, True),
                                          sgm_noise_multiplier=sgm, cond_image=owner, cond_weight=weight,
                                          batched=batched, guidance_scale=p.cfg_scale)
        return BatchGuidance(guidance, rows, levels, sigma0, True, ("forge", sigma0, sgm), cond_tensor,
                             uncond_tensor, image_cond, owner)
    cond_kwargs = {"cond": _make_condition_dict(sd_model, cond_tensor, cond_image_cond, False)}
    uncond_kwargs = {"cond": _make_condition_dict(sd_model, uncond_tensor, image_cond, True)}
    if hasattr(sampler, "get_sigmas"):
        sigmas = sampler.get_sigmas(p, p.steps).float()
        sigma0 = float(sigmas[0])
        sgm = bool(getattr(shared.opts, "sgm_noise_multiplier", False))
        guidance = guidance_from_denoiser(sampler_model(sampler), sigma0, cond_kwargs, uncond_kwargs,
                                          sgm_noise_multiplier=sgm, cond_image=owner, cond_weight=weight,
                                          batched=batched, guidance_scale=p.cfg_scale)
        return BatchGuidance(guidance, rows, sigmas, sigma0, True, ("k", sigma0, sgm), cond_tensor, uncond_tensor,
                             image_cond, owner)
    timesteps = sampler.get_timesteps(p, p.steps)
    first_used = timesteps.flip(0).float().cpu()
    t0 = float(first_used[0])
    guidance = guidance_from_eps_model(sampler_model(sampler), t0, cond_kwargs, uncond_kwargs, cond_image=owner,
                                       cond_weight=weight, batched=batched, guidance_scale=p.cfg_scale)
    return BatchGuidance(guidance, rows, first_used, t0, False, ("t", t0), cond_tensor, uncond_tensor, image_cond,
                         owner)


def _image_key(p: Any, job: Job, bg: BatchGuidance, x: Tensor, i: int) -> str:
    """Everything that determines image i's adjusted noise."""
    rows = (bg.owner == i).nonzero().flatten()
    return _digest(
        getattr(p, "sd_model_hash", None),
        str(getattr(p, "extra_network_data", None)),
        bg.key_parts,
        str(x.device),
        x[i],
        select_rows({"c": bg.cond_rows}, rows.to(x.device) if isinstance(bg.cond_rows, Tensor) else rows),
        [w for _, w in bg.rows[i]],
        select_rows({"u": bg.uncond_rows}, torch.tensor([i])),
        bg.image_cond[i],
        job.config.to_string(),
    )


# -- the mitigation of one batch ----------------------------------------------------------------------------------
def mitigate_batch(p: Any, job: Job, x: Tensor, c: Any, uc: Any) -> Tensor:
    """Adjusted noise for the current batch (same shape/dtype/device as ``x``); records per-image results."""
    from modules import shared

    state = shared.state
    bg = guidance_for_batch(p, x, c, uc, job.forge)
    batch = x.shape[0]
    offset = p.iteration * p.batch_size
    keys = [_image_key(p, job, bg, x, i) for i in range(batch)]
    cached = {i: job.cache.get(k) for i, k in enumerate(keys)}
    hits = [i for i, v in cached.items() if v is not None]
    z_new = x.detach().clone()
    if hits:  # verify: the risk at the same noise must still agree (one evaluation per hit)
        index = torch.tensor(hits)
        risk = methods.risk_score(x.index_select(0, index.to(x.device)), bg.guidance.select(index))
        for j, i in enumerate(hits):
            entry = cached[i]
            assert entry is not None
            if math.isclose(float(risk[j]), entry.risk, rel_tol=VERIFY_RTOL, abs_tol=1e-6):
                z_new[i] = entry.z.to(device=x.device, dtype=x.dtype)
                job.records[offset + i] = ImageRecord(**{**entry.record.__dict__, "cached": True})
            else:
                cached[i] = None
    misses = [i for i in range(batch) if cached[i] is None]

    def should_stop() -> bool:
        return bool(state.interrupted or state.skipped)

    def progress(info: methods.ProgressInfo) -> None:
        state.textinfo = (f"MemSafe {info.method}: iteration {info.iteration}/{info.max_iterations}, "
                          f"{info.active} image(s) adjusting")
        state.sampling_steps = info.max_iterations
        state.sampling_step = info.iteration

    uncond_images = torch.zeros(batch, dtype=torch.bool)
    measure_from_sampler: list[int] = []
    if misses:
        index = torch.tensor(misses)
        sub = bg.guidance if len(misses) == batch else bg.guidance.select(index)
        unet = None if job.forge else unet_of(p.sd_model)  # Forge: forward-only, nothing to freeze or recompute
        mode = checkpointing_setting() if unet is not None else "on_oom"  # on_oom without a model: halving only
        budget = memory_budget() if mode in ("budget", "on_oom") else None
        with ldm_checkpointing_off(unet):
            result = methods.adjust_noise(x.index_select(0, index.to(x.device)), sub, job.config,
                                          progress=progress, should_stop=should_stop, measure_after=False,
                                          model=unet, checkpointing=mode, memory_budget=budget,
                                          max_batch=images_per_call())
        scaled = result.scaled
        outside = result.out_of_distribution()
        for j, i in enumerate(misses):
            applied = result.applied[j]
            limit = scaled.target if applied == "per_sample" else scaled.risk_threshold
            after = float(result.norm_after[j])
            record = ImageRecord(applied, float(result.norm_before[j]), after, int(result.iterations[j]), limit,
                                 out_of_distribution=bool(outside[j]), noise_rms=float(result.noise_rms[j]),
                                 noise_rms_limit=result.noise_rms_limit)
            job.records[offset + i] = record
            z_new[i] = result.z[j]
            job.cache.put(keys[i], CachedNoise(result.z[j].detach().cpu().clone(), record.risk_before, record))
            if math.isnan(after):
                measure_from_sampler.append(i)
    for i in range(batch):
        record = job.records[offset + i]
        uncond_images[i] = record.applied == "batch_wise" and job.config.uncond_steps > 0
        if math.isnan(record.risk_after) and i not in measure_from_sampler:
            measure_from_sampler.append(i)
    # every image was last evaluated at the noise the sampler starts from (auto mode left it unchanged, per-sample
    # stopped there): that evaluation is the sampler's first model call
    reuse = None if job.forge else bg.guidance.call_at(z_new)  # k-diffusion and timesteps samplers alike
    if bool(uncond_images.any()) or measure_from_sampler or reuse is not None:
        job.set_sampling(SamplingContext(
            denoiser=p.sampler.model_wrap_cfg, schedule=bg.schedule, uncond_steps=job.config.uncond_steps,
            uncond_images=uncond_images, rows=bg.rows, k_diffusion=bg.k_diffusion, first_level=bg.first_level,
            measure=[offset + i if i in measure_from_sampler else -1 for i in range(batch)], reuse=reuse))
        if job.forge:  # Forge never calls cfg_denoised callbacks
            job.add_cleanup(forge.install_post_cfg(p, job.forge_post_cfg))
        else:
            job.install_callbacks()
    else:
        job.set_sampling(None)
    return z_new


def before_sampling(p: Any, noise: Tensor, c: Any, uc: Any) -> None:
    """``Script.process_before_every_sampling`` (A1111 >= 1.10, Forge): adjust ``noise`` in place (Forge: set
    ``p.modified_noise``), first pass only."""
    job = getattr(p, JOB_ATTR, None)
    if job is None or getattr(p, "is_hr_pass", False):
        return
    if job.error is not None:
        _refuse_sampling(p.sampler, job.error)
        return
    if job.skipped_reason is not None:
        return
    try:
        if job.forge:  # the sampler starts from p.modified_noise if set (a script before MemSafe may have set it)
            chosen = getattr(p, "modified_noise", None)
            p.modified_noise = mitigate_batch(p, job, noise if chosen is None else chosen, c, uc)
        else:
            noise.copy_(mitigate_batch(p, job, noise, c, uc))
    except Interrupted:
        _record_interrupted(p, job, noise.shape[0])
    except Exception as e:  # noqa: BLE001 - every failure must fail closed, not crash the WebUI
        log.exception("memsafe: mitigation failed")
        job_failed(p, job, e)
        if job.error is not None:
            _refuse_sampling(p.sampler, job.error)


def _record_interrupted(p: Any, job: Job, batch: int) -> None:
    """Interrupt/Skip during the adjustment: the sampler stops at its first step (state.interrupted/skipped), so
    these images are not generated from unmitigated noise; the infotext says what happened."""
    log.info("memsafe: interrupted/skipped while adjusting the noise; the sampler stops next")
    offset = p.iteration * p.batch_size
    for i in range(batch):
        job.records[offset + i] = ImageRecord("interrupted", math.nan)


class _OneShotNoise:
    """A1111 1.6-1.9: stands in for ``p.rng``; its first ``next()`` returns the adjusted noise (the sampler and
    the conds exist by then, processing.py ``sample``), later calls (ancestral noise) pass through."""

    def __init__(self, p: Any, rng: Any) -> None:
        self._p, self._rng, self._used = p, rng, False

    def next(self) -> Tensor:
        x = self._rng.next()
        if self._used:
            return x
        self._used = True
        p = self._p
        job = getattr(p, JOB_ATTR, None)
        if job is None or getattr(p, "is_hr_pass", False) or job.skipped_reason is not None:
            return x
        if job.error is not None:
            raise MemSafeError(f"{job.error} (no image was generated; MemSafe fails closed)")
        try:
            return mitigate_batch(p, job, x, p.c, p.uc)
        except Interrupted:
            _record_interrupted(p, job, x.shape[0])
            return x
        except Exception as e:  # noqa: BLE001
            job_failed(p, job, e)
            if job.error is not None:
                raise MemSafeError(f"{job.error} (no image was generated; MemSafe fails closed)") from e
            return x

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rng, name)


def has_sampling_hook() -> bool:
    """Whether this WebUI calls ``process_before_every_sampling`` (A1111 >= 1.10)."""
    from modules import scripts

    return hasattr(scripts.Script, "process_before_every_sampling")


def before_batch(p: Any) -> None:
    """``Script.process_batch``: on A1111 1.6-1.9 install the one-shot noise proxy for this batch. Before 1.9 the
    per-image infotext values are cleared: until ``before_image`` writes this batch's, an infotext made now (the
    hires pass's "before highres fix" save) carries none rather than the previous batch's last image's."""
    job = getattr(p, JOB_ATTR, None)
    if job is None:
        return
    if not job.infotext_callables:
        _write_image_values(p, job, None)
    if has_sampling_hook() or isinstance(p.rng, _OneShotNoise):
        return
    p.rng = _OneShotNoise(p, p.rng)


def before_image(p: Any, batch_index: int | None = None) -> None:
    """``Script.postprocess_batch`` (with ``batch_index=0``) and ``postprocess_image`` (``p.batch_index``): before
    A1111 1.9, whose infotext has no per-image values, write the MemSafe texts of the image whose infotext comes
    next as plain strings (processing.py L1017-1087: postprocess_batch, then per image ``p.batch_index = i``,
    postprocess_image, the image's saves and infotext). Two infotexts still get a neighbour's text there: a
    "before face restoration" save of image i > 0 (made before its postprocess_image: image i-1's) and the grid's
    (made after the last image: the last image's). From 1.9 on the job's callables give every infotext its own."""
    job = getattr(p, JOB_ATTR, None)
    if job is None or job.infotext_callables:
        return
    position = p.batch_index if batch_index is None else batch_index
    _write_image_values(p, job, int(p.iteration) * int(p.batch_size) + int(position))


def _write_image_values(p: Any, job: Job, index: int | None) -> None:
    """The MemSafe result and warning of image ``index`` of the job as plain infotext values (None: none)."""
    params = p.extra_generation_params
    params["MemSafe result"] = None if index is None else job.result_text(index)
    params["MemSafe warning"] = None if index is None else job.warning_text(index)


def finish_job(p: Any, processed: Any) -> None:
    """``Script.postprocess``: per-image values become plain lists for the API (its JSON drops callables,
    processing.py L607), warnings go to the comments shown in the UI, and the callbacks are removed."""
    job = getattr(p, JOB_ATTR, None)
    if job is None:
        return
    job.finish()
    total = job.total_images(p)
    params = p.extra_generation_params
    if "MemSafe result" in params:  # callables, or before 1.9 the last image's strings (before_image)
        params["MemSafe result"] = [job.result_text(index=i) for i in range(total)]
    if "MemSafe warning" in params:
        warnings = [job.warning_text(index=i) for i in range(total)]
        params["MemSafe warning"] = warnings if any(warnings) else None
        notes = [f"MemSafe: image {i + 1} (seed {p.all_seeds[i]}): {w}" for i, w in enumerate(warnings) if w]
        if notes and processed is not None:
            processed.comments = (processed.comments or "") + "".join(n + "\n" for n in notes)
    if job.skipped_reason and processed is not None:
        processed.comments = (processed.comments or "") + f"MemSafe NOT APPLIED: {job.skipped_reason}\n"
