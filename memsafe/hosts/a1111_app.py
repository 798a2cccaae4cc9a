"""WebUI-wide parts of the MemSafe extension: settings, XYZ-plot axes, the API guard and MemSafe's own routes.

Registered once at start-up by ``scripts/memsafe.py`` (these are the WebUI's start-up callbacks, not per-job
state). Host modules are imported inside the functions.
"""

from __future__ import annotations

import inspect
import logging
import sys
from secrets import compare_digest
from typing import Any

from .. import __version__, methods
from ..config import OPTIMIZERS, PRESETS, field_docs
from ..errors import ConfigError, NotApplicableError
from . import a1111, api_guard
from .webui_args import ARG_NAMES, PRESET_CHOICES, UI_METHODS, parse_script_args

log = logging.getLogger("memsafe")
SECTION = ("memsafe", "MemSafe")
MAX_RISK_SEEDS = 64


# -- settings ----------------------------------------------------------------------------------------------------
def on_ui_settings() -> None:
    """Settings > MemSafe (``shared.opts.add_option``, options.py L256)."""
    import gradio as gr
    from modules import shared

    def add(key: str, info: Any) -> None:
        shared.opts.add_option(key, info)

    add("memsafe_default_method", shared.OptionInfo(
        "auto", "Default method when MemSafe is ticked", gr.Radio, {"choices": list(UI_METHODS)}, section=SECTION))
    add("memsafe_fail_policy", shared.OptionInfo(
        a1111.FAIL_STOP, "If mitigation was asked for and cannot be applied", gr.Radio,
        {"choices": list(a1111.FAIL_POLICIES)}, section=SECTION))
    add("memsafe_cache_size", shared.OptionInfo(
        64, "Adjusted-noise cache (images; 0 = off)", gr.Slider, {"minimum": 0, "maximum": a1111.MAX_CACHE_SIZE, "step": 1},
        section=SECTION).info("re-running a seed (another upscaler, another batch) reuses its adjusted noise"))
    add("memsafe_checkpointing", shared.OptionInfo(
        "on_oom", "Per-sample: recompute UNet activations during backprop (activation checkpointing)", gr.Radio,
        {"choices": ["on_oom", "budget", "always", "never"]}, section=SECTION).info(
        "on_oom: only after a CUDA out-of-memory error, then as budget; budget: only what does not fit in the "
        "budget below (the first iteration measures); always: lowest VRAM, about one more UNet pass per "
        "iteration; the same images up to round-off; not used with --lowvram"))
    add("memsafe_memory_budget_mb", shared.OptionInfo(
        0, "Per-sample: VRAM budget for the backward pass's kept activations, MiB (0 = 3/4 of the free VRAM)",
        gr.Number, {"minimum": 0, "precision": 0}, section=SECTION).info(
        "checkpointing 'budget' and 'on_oom': the UNet parts that do not fit are recomputed, the cheapest "
        "recomputation per byte first"))
    add("memsafe_images_per_call", shared.OptionInfo(
        0, "Per-sample: images per UNet call (0 = the whole batch)", gr.Slider,
        {"minimum": 0, "maximum": 16, "step": 1}, section=SECTION).info(
        "1 with checkpointing 'always': the least VRAM (one image's backward pass at a time, whatever the batch); "
        "same images; on a CUDA out-of-memory error the batch is split by itself anyway"))
    add("memsafe_ops_backend", shared.OptionInfo(
        "auto", "Fused-ops backend", gr.Radio, {"choices": ["auto", "cuda", "cpp", "reference"]}, section=SECTION,
        onchange=apply_ops_backend).info("auto: CUDA or C++ if it builds, else the PyTorch reference (same numbers)"))


def apply_ops_backend() -> None:
    """Hand the setting to the ops loader (it reads MEMSAFE_OPS_BACKEND at its first use)."""
    import os

    from modules import shared

    choice = getattr(shared.opts, "memsafe_ops_backend", "auto")
    if choice == "auto":
        os.environ.pop("MEMSAFE_OPS_BACKEND", None)
    else:
        os.environ["MEMSAFE_OPS_BACKEND"] = choice
    from .. import ops

    reset = getattr(ops, "reset_backend", None)
    if callable(reset):
        reset()


# -- XYZ plot ----------------------------------------------------------------------------------------------------
XYZ_AXES: tuple[tuple[str, type, str, Any], ...] = (
    ("[MemSafe] Enabled", str, "enabled", ["true", "false"]),
    ("[MemSafe] Method", str, "method", list(UI_METHODS)),
    ("[MemSafe] Target", float, "target", None),
    ("[MemSafe] Risk threshold", float, "risk_threshold", None),
    ("[MemSafe] Learning rate", float, "lr", None),
    ("[MemSafe] Rho", float, "rho", None),
    ("[MemSafe] Gamma", float, "gamma", None),
    ("[MemSafe] Iterations (batch-wise)", int, "iterations", None),
    ("[MemSafe] Unconditional steps", int, "uncond_steps", None),
    ("[MemSafe] Max iterations", int, "max_iterations", None),
    ("[MemSafe] Per-sample step", str, "optimizer", list(OPTIMIZERS)),  # Polyak against the paper's AdamW
    ("[MemSafe] Largest Polyak step", float, "max_step", None),
    ("[MemSafe] Polyak steps with the norm held", int, "hold_norm_steps", None),
)


def find_xyz_module() -> Any | None:
    """The loaded xyz_grid script module (its name differs between versions: 'xyz_grid.py', 'scripts.xyz_grid')."""
    from modules import scripts

    for data in getattr(scripts, "scripts_data", []):
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid") and hasattr(data, "module"):
            return data.module
    for name in ("xyz_grid.py", "scripts.xyz_grid"):
        if name in sys.modules:
            return sys.modules[name]
    return None


def on_before_ui() -> None:
    """Add MemSafe axes to the XYZ plot; each sets ``p.memsafe_<field>``, read by the job (a1111.request_from)."""
    xyz = find_xyz_module()
    if xyz is None:
        log.info("memsafe: XYZ plot script not found; no MemSafe axes")
        return
    known = {getattr(option, "label", None) for option in xyz.axis_options}
    for label, kind, name, choices in XYZ_AXES:
        if label in known:  # registering twice (UI reload) would duplicate the axes
            continue
        kwargs = {"choices": (lambda values=choices: values)} if choices else {}
        xyz.axis_options.append(xyz.AxisOptionTxt2Img(label, kind, xyz.apply_field(f"memsafe_{name}"), **kwargs))


# -- routes ------------------------------------------------------------------------------------------------------
def _auth_dependencies() -> list[Any]:
    """The same HTTP basic auth as the WebUI's own API routes (api.py L275-285): our routes do not get it for free."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials
    from modules import shared

    if not getattr(shared.cmd_opts, "api_auth", None):
        return []
    credentials = dict(item.split(":", 1) for item in shared.cmd_opts.api_auth.split(","))

    def auth(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:  # noqa: B008 - FastAPI idiom
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password, expected):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return [Depends(auth)]


def info() -> dict[str, Any]:
    """What ``GET /memsafe/v1/info`` answers."""
    from .. import ops

    backend = getattr(ops, "backend_info", None)
    return {
        "version": __version__,
        "host": "forge" if a1111.is_forge() else "a1111",
        "arg_order": list(ARG_NAMES),
        "methods": list(UI_METHODS),
        "presets": {name: {"family": p.family, "calibrated": p.calibrated, "source": p.source, "values": dict(p.values)}
                    for name, p in PRESETS.items()},
        "preset_choices": list(PRESET_CHOICES),
        "fields": field_docs(),
        "ops_backend": backend() if callable(backend) else {"backend": "reference"},
    }


def score_risk(body: dict[str, Any]) -> dict[str, Any]:
    """``POST /memsafe/v1/risk``: the risk of a prompt for some seeds with the loaded model, without generating.

    Runs the WebUI's own pipeline (prompt parsing, extra networks, conds, per-seed noise) and stops it right
    before the sampler would start, so the numbers are exactly those a generation would see.
    """
    from contextlib import closing

    from modules import processing, sd_samplers, shared
    from modules.call_queue import queue_lock

    if not isinstance(body, dict):
        raise ConfigError("body", "expected a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise ConfigError("prompt", "expected a string")
    seeds = body.get("seeds")
    if not isinstance(seeds, list) or not seeds or len(seeds) > MAX_RISK_SEEDS or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError("seeds", f"expected a list of 1 to {MAX_RISK_SEEDS} non-negative integers")
    request = parse_script_args([{"enabled": True, **body.get("memsafe", {"method": "auto"})}])
    allowed = {"negative_prompt", "width", "height", "steps", "cfg_scale", "sampler_name", "scheduler", "subseed",
               "subseed_strength", "seed_resize_from_h", "seed_resize_from_w"}
    unknown = set(body) - allowed - {"prompt", "seeds", "memsafe"}
    if unknown:
        raise ConfigError(sorted(unknown)[0], f"unknown field; allowed: prompt, seeds, memsafe, {', '.join(sorted(allowed))}")
    args = {k: body[k] for k in allowed if k in body}
    unsupported = sorted(set(args) - set(inspect.signature(processing.StableDiffusionProcessingTxt2Img).parameters))
    if unsupported:  # scheduler: A1111 1.9 added it
        raise ConfigError(unsupported[0], "this WebUI's txt2img has no such field (A1111 1.9 added scheduler)")
    scores: list[float] = []
    result: dict[str, Any] = {}

    class _Scored(Exception):
        pass

    with queue_lock, closing(processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model, prompt=prompt, seed=seeds[0], batch_size=len(seeds), n_iter=1,
            do_not_save_samples=True, do_not_save_grid=True, **args)) as p:
        p.scripts = None
        family = a1111.model_family(shared.sd_model)
        config = request.resolve(family)

        def sample(conditioning: Any, unconditional_conditioning: Any, *_: Any, **__: Any) -> Any:
            p.sampler = sd_samplers.create_sampler(p.sampler_name, p.sd_model)
            x = p.rng.next()
            bg = a1111.guidance_for_batch(p, x, conditioning, unconditional_conditioning)
            scores.extend(methods.risk_score(x, bg.guidance).tolist())
            scaled = config.scaled(x[0].numel())
            result["threshold"] = scaled.risk_threshold
            result["target"] = scaled.target
            raise _Scored

        p.sample = sample
        p.seed = list(seeds)  # processing.py L900-903: a list of seeds is used as given
        shared.state.begin(job="memsafe_risk")
        try:
            processing.process_images(p)
        except _Scored:
            pass
        finally:
            shared.state.end()
    if len(scores) != len(seeds):
        raise NotApplicableError("memsafe: the WebUI did not reach sampling; nothing was scored")
    return {"risk": scores, "at_risk": [s >= result["threshold"] for s in scores], "seeds": seeds,
            "preset": family if request.preset == "auto" else request.preset, **result}


def on_app_started(_demo: Any, app: Any) -> None:
    """Install the API guard and the routes ``GET /memsafe/v1/info`` and ``POST /memsafe/v1/risk``."""
    from fastapi import HTTPException

    api_guard.install(app, forge=a1111.is_forge())
    deps = _auth_dependencies()

    def risk_route(body: dict[str, Any]) -> dict[str, Any]:
        try:
            return score_risk(body)
        except ConfigError as e:
            raise HTTPException(status_code=422, detail={"error": "MemSafeArgumentError", "field": e.field,
                                                         "detail": str(e)}) from e
        except NotApplicableError as e:
            raise HTTPException(status_code=422, detail={"error": "MemSafeNotApplicable", "detail": str(e)}) from e

    app.add_api_route("/memsafe/v1/info", info, methods=["GET"], dependencies=deps)
    app.add_api_route("/memsafe/v1/risk", risk_route, methods=["POST"], dependencies=deps)
