"""The adapter on Forge, driven through tests/forge_standin.py (Forge's backend restated on the A1111 stand-in,
the same real UNet and k-diffusion samplers)."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

import a1111_standin as webui
import forge_standin as forge_webui
import memsafe
from memsafe import adjust_noise, guidance_from_denoiser
from memsafe.hosts import a1111, forge
from memsafe.hosts.webui_args import parse_script_args
from test_a1111 import first_pass_noise, make_p, on, reference_guidance


@pytest.fixture()
def sd_model(unet):
    return webui.StandInSDModel(unet)


@pytest.fixture()
def host(sd_model):
    modules = forge_webui.install(sd_model)
    yield modules
    forge_webui.uninstall()


@pytest.fixture()
def script(host):
    return webui.load_script().MemSafeScript()


def run(sd_model, script, args, **kw):
    p = make_p(sd_model, script, args, processing=forge_webui.ForgeTxt2Img, **kw)
    return p, webui.run_job(p)


def forge_config(method, **fields):
    """What the request resolves to on Forge: per-sample's gradient forward-only unless chosen."""
    return forge.forge_request(parse_script_args(on(method, **fields))).resolve("sd1")


def start_and_guidance(p, sd_model):
    """(the sampler's start as unit-variance noise, a guidance built without the adapter at its first level)."""
    sampler = p.samplers[0]
    if p.sampler_name == "ddim":  # classic eps estimation: sigma = sigmas[t], x = z * sqrt(1 + sigma^2)
        t0 = int(sampler.get_timesteps(p, p.steps)[-1])
        sigma = float(sd_model.forge_objects.unet.model.predictor.sigmas[t0])
        denoiser, cond, uncond, _ = reference_guidance(sd_model, p, sigma)
        return sampler.started_from, guidance_from_denoiser(denoiser, sigma, cond, uncond, sgm_noise_multiplier=True)
    sigmas = sampler.get_sigmas(p, p.steps)
    _, _, _, guidance = reference_guidance(sd_model, p, float(sigmas[0]))
    return sampler.started_from / sigmas[0], guidance


@pytest.mark.parametrize("sampler_name", ["sample_euler", "ddim"])
@pytest.mark.parametrize("method", ["per_sample", "batch_wise"])
def test_the_forge_sampler_starts_from_the_adjusted_noise(host, sd_model, script, method, sampler_name):
    p, processed = run(sd_model, script, on(method), batch_size=2, sampler_name=sampler_name)
    assert p.scripts.errors == [] and host.script_callbacks.errors == []
    started, guidance = start_and_guidance(p, sd_model)
    expected = adjust_noise(first_pass_noise(p), guidance, forge_config(method)).z
    torch.testing.assert_close(started, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, first_pass_noise(p))
    assert f"MemSafe result: {method}" in processed.infotexts[1]
    assert ("gradient=finite_difference" in processed.infotexts[0]) == (method == "per_sample")
    # the job's UnetPatcher is back, without MemSafe's post-CFG function; no A1111 callback was ever registered
    unet = sd_model.forge_objects.unet
    assert unet is sd_model.forge_objects_after_applying_lora.unet and "sampler_post_cfg_function" not in unet.model_options
    assert [c for cbs in host.script_callbacks.callback_map.values() for c in cbs] == []


def test_forge_batch_wise_samples_its_first_steps_without_the_prompt(host, sd_model, script):
    """The whole image equals the core's reference (adjusted noise, CFG with the first K steps unconditional), and
    the risk after adjustment, read from the sampler's first step by the post-CFG function, a direct evaluation."""
    p, processed = run(sd_model, script, on("batch_wise"), batch_size=2)
    sigmas = p.samplers[0].get_sigmas(p, p.steps)
    denoiser, cond, uncond, guidance = reference_guidance(sd_model, p, float(sigmas[0]))
    res = adjust_noise(first_pass_noise(p), guidance, forge_config("batch_wise"))
    assert bool(res.uncond_images.all())
    model = memsafe.CFGDenoiser(denoiser, cond, uncond, p.cfg_scale, sigmas=sigmas, uncond_steps=2,
                                uncond_images=res.uncond_images)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = webui.K.sampling.sample_euler(model, res.z * sigmas[0], sigmas, disable=True)
        with_prompt = webui.K.sampling.sample_euler(memsafe.CFGDenoiser(denoiser, cond, uncond, p.cfg_scale),
                                                    res.z * sigmas[0], sigmas, disable=True)
    images = torch.stack(processed.images)
    torch.testing.assert_close(images, expected, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(images, with_prompt, atol=1e-3)
    with torch.no_grad():
        direct = guidance(res.z).flatten(1).norm(dim=1)
    measured = torch.tensor([p.memsafe_job.records[i].risk_after for i in range(2)])
    torch.testing.assert_close(measured, direct, rtol=1e-3, atol=1e-5)


def first_step_risk(sd_model, prompt, batch_size, total_weight, noise=None):
    """||eps_c - eps_u|| per image at the first step of a run without MemSafe (from ``noise`` if given), from
    Forge's own predictions: the weighted mean of the AND parts times their total weight, as its CFG combines."""
    first = {}

    class SetNoise:  # a script that sets p.modified_noise (Forge's way to choose the noise)
        def process_before_every_sampling(self, p, *args, **kwargs):
            p.modified_noise = noise

    def record(args):
        first.setdefault("args", args)
        return args["denoised"]

    plain = forge_webui.ForgeTxt2Img(sd_model, prompt=prompt, batch_size=batch_size)
    if noise is not None:
        plain.scripts = webui.ScriptRunner(SetNoise())
    unet = sd_model.forge_objects_after_applying_lora.unet
    unet.set_model_sampler_post_cfg_function(record)
    try:
        webui.run_job(plain)
    finally:
        unet.model_options.pop("sampler_post_cfg_function")
    args = first["args"]
    eps_tilde = (args["uncond_denoised"] - args["cond_denoised"]) * total_weight / args["sigma"].view(-1, 1, 1, 1)
    return eps_tilde.flatten(1).norm(dim=1)


@pytest.mark.parametrize("sdxl", [False, True])
def test_forge_risk_before_and_after_are_the_first_steps_for_and_prompts(host, sd_model, script, sdxl):
    """An ``AND`` prompt (Forge runs one condition per part): the risk before (the adapter's guidance) and after
    (read by the post-CFG function from the sampler's first step) are that step's eps_c - eps_u; with SDXL's
    ``{"crossattn", "vector"}`` conditioning too."""
    sd_model.is_sdxl, sd_model.is_sd1 = sdxl, not sdxl
    assert isinstance(webui.encode("a red circle"), dict) == sdxl  # the conds the job will carry
    prompt = "a red circle AND a blue square :0.5"
    p, _ = run(sd_model, script, on("batch_wise"), prompt=prompt, batch_size=2)
    records = [p.memsafe_job.records[i] for i in range(2)]
    before = torch.tensor([r.risk_before for r in records])
    torch.testing.assert_close(before, first_step_risk(sd_model, prompt, 2, 1.5), rtol=1e-4, atol=1e-5)
    sigma0 = p.samplers[0].get_sigmas(p, p.steps)[0]
    adjusted = p.samplers[0].started_from / sigma0
    after = torch.tensor([r.risk_after for r in records])
    torch.testing.assert_close(after, first_step_risk(sd_model, prompt, 2, 1.5, adjusted), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before, after)


def test_forge_per_sample_with_autograd_stops_the_job_naming_gradient(host, sd_model, script):
    with pytest.raises(a1111.MemSafeError, match="gradient: got 'autograd' on Forge.*allowed on Forge: "
                                                 "'finite_difference'"):
        run(sd_model, script, on("per_sample", gradient="autograd"))
    _, processed = run(sd_model, script, on("batch_wise", gradient="autograd"))  # batch-wise never backprops
    assert "MemSafe result: batch_wise" in processed.infotexts[0]


def test_forge_off_is_bit_identical_and_the_hires_pass_is_untouched(host, sd_model, script):
    _, without = run(sd_model, script, [], batch_size=2)
    p, disabled = run(sd_model, script, [False, "batch_wise"], batch_size=2)
    assert torch.equal(torch.stack(without.images), torch.stack(disabled.images))
    assert p.extra_generation_params == {} and not hasattr(p, a1111.JOB_ATTR)
    p, _ = run(sd_model, script, on("batch_wise"), enable_hr=True)
    assert torch.equal(p.hr_noise, p.hr_noise_before_hook)
    assert p.modified_noise is None


def test_forge_noise_set_by_an_earlier_script_is_the_noise_adjusted(host, sd_model, script):
    class EarlierScript:  # another extension's process_before_every_sampling, run before MemSafe's
        def process_before_every_sampling(self, p, *args, **kwargs):
            p.modified_noise = kwargs["noise"].flip(0)
            return script.process_before_every_sampling(p, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(script, name)

    p = forge_webui.ForgeTxt2Img(sd_model, batch_size=2)
    p.scripts, p.script_args = webui.ScriptRunner(EarlierScript()), tuple(on("batch_wise"))
    p.create_sampler = lambda create=p.create_sampler: p.__dict__.setdefault("first_sampler", create())
    webui.run_job(p)
    sigmas = p.first_sampler.get_sigmas(p, p.steps)
    _, _, _, guidance = reference_guidance(sd_model, p, float(sigmas[0]))
    expected = adjust_noise(first_pass_noise(p).flip(0), guidance, forge_config("batch_wise")).z
    torch.testing.assert_close(p.first_sampler.started_from / sigmas[0], expected, rtol=1e-4, atol=1e-4)


def test_forge_flow_models_and_extra_concat_unets_are_refused_and_families_read(host, sd_model, script):
    sd_model.is_sd1 = False  # e.g. Flux: none of the SD1/SD2/SDXL flags
    with pytest.raises(a1111.MemSafeError, match="Forge model StandInSDModel is not supported"):
        run(sd_model, script, on("batch_wise"))
    sd_model.is_sd1 = True
    backend = webui.sys.modules.pop("backend.sampling.sampling_function")  # reForge, Forge before 2.0
    try:
        with pytest.raises(a1111.MemSafeError, match="this Forge has no backend.sampling"):
            run(sd_model, script, on("batch_wise"))
    finally:
        webui.sys.modules["backend.sampling.sampling_function"] = backend
    sd_model.forge_objects_after_applying_lora.unet.extra_concat_condition = torch.zeros(1, 4, 8, 8)  # IC-Light
    with pytest.raises(a1111.MemSafeError, match="extra concat condition"):
        run(sd_model, script, on("batch_wise"))
    predictor = types.SimpleNamespace(prediction_type="v_prediction")
    v_model = types.SimpleNamespace(is_sd2=True, forge_objects=types.SimpleNamespace(
        unet=types.SimpleNamespace(model=types.SimpleNamespace(predictor=predictor))))
    assert a1111.model_family(v_model) == "sd2-v"
    predictor.prediction_type = "epsilon"
    assert a1111.model_family(v_model) == "sd2"


@pytest.mark.parametrize("on_forge", [True, False])
def test_the_ui_offers_forge_only_the_forward_only_gradient(sd_model, on_forge):
    (forge_webui if on_forge else webui).install(sd_model)
    try:
        module = webui.load_script()
        module.MemSafeScript().ui(False)
        radios = {call.kwargs["elem_id"]: call for call in module.gr.Radio.call_args_list}
        gradient = radios["script_memsafe_gradient"]
        assert gradient.args[0] == (["finite_difference"] if on_forge else ["autograd", "finite_difference"])
        assert gradient.kwargs["value"] == ("finite_difference" if on_forge else "autograd")
        (change,) = module.gr.Radio.return_value.change.call_args_list  # the Method radio's cost line
        assert ("Forge: forward-only gradient" in change.args[0]("per_sample")) == on_forge
    finally:
        forge_webui.uninstall()


def test_the_info_route_names_the_host(host):
    from memsafe.hosts import a1111_app

    assert a1111_app.info()["host"] == "forge"
    forge_webui.uninstall()
    webui.install(webui.StandInSDModel(torch.nn.Identity()))
    assert a1111_app.info()["host"] == "a1111"


@pytest.mark.skipif(not os.environ.get("MEMSAFE_FORGE_SRC"), reason="set MEMSAFE_FORGE_SRC to a Forge checkout")
def test_forges_own_conditioning_and_batching_are_in_place_when_a_checkout_is_given(host):
    """With MEMSAFE_FORGE_SRC the other tests run on Forge's own condition.py and calc_cond_uncond_batch, not on
    the stand-in's restatements: a wrong path must not silently test the restatements again."""
    src = os.path.realpath(os.environ["MEMSAFE_FORGE_SRC"])
    condition = sys.modules["backend.sampling.condition"]
    functions = sys.modules["backend.sampling.sampling_function"]
    for fn in (condition.compile_conditions, condition.compile_weighted_conditions,
               functions.calc_cond_uncond_batch):
        assert os.path.realpath(fn.__code__.co_filename).startswith(src + os.sep), fn
