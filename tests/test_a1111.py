"""The A1111 adapter and script, driven through a stand-in WebUI pipeline (tests/a1111_standin.py) with a real
UNet and real k-diffusion samplers."""

from __future__ import annotations

import math

import pytest
import torch

import a1111_standin as webui
import memsafe
from memsafe import ConfigError, MitigationConfig, adjust_noise, guidance_from_denoiser
from memsafe.guidance import Guidance
from memsafe.hosts import a1111
from memsafe.hosts.webui_args import ARG_NAMES, parse_script_args

PARAMS = {"lr": 0.05, "target": 0.0, "max_iterations": 3, "rho": 3.0, "gamma": 0.7, "iterations": 2,
          "uncond_steps": 2, "risk_threshold": 0.0, "scale_with_size": False}


def on(method="per_sample", **fields):
    """The script's arguments as the API's dict form: preset custom with small-model parameters."""
    return [{"enabled": True, "method": method, "preset": "custom", **{**PARAMS, **fields}}]


@pytest.fixture()
def sd_model(unet):
    return webui.StandInSDModel(unet)


@pytest.fixture()
def host(sd_model):
    modules = webui.install(sd_model)
    yield modules
    webui.uninstall()


@pytest.fixture()
def script(host):
    return webui.load_script().MemSafeScript()


def make_p(sd_model, script, args, processing=webui.StandInTxt2Img, **kw):
    """A txt2img job (``processing``: A1111's, or Forge's from tests/forge_standin.py) with MemSafe's ``args``;
    ``p.samplers`` records the samplers it creates."""
    p = processing(sd_model, **kw)
    p.scripts = webui.ScriptRunner(script, has_sampling_hook=hasattr(
        webui.sys.modules["modules.scripts"].Script, "process_before_every_sampling"))
    p.script_args = tuple(args)
    samplers = []
    create = p.create_sampler

    def recording():
        samplers.append(create())
        return samplers[-1]

    p.create_sampler = recording
    p.samplers = samplers
    return p


def run(sd_model, script, args, **kw):
    p = make_p(sd_model, script, args, **kw)
    return p, webui.run_job(p)


def callbacks(host):
    return [c for cbs in host.script_callbacks.callback_map.values() for c in cbs]


def first_pass_noise(p):
    return torch.stack([torch.randn((4, p.height // 8, p.width // 8), generator=torch.Generator().manual_seed(s))
                        for s in p.all_seeds])


def reference_guidance(sd_model, p, sigma0):
    c = webui.reconstruct_cond_batch([[webui.ScheduledPromptConditioning(p.steps, webui.encode(t))]
                                      for t in p.all_prompts], 0)
    uc = webui.reconstruct_cond_batch([[webui.ScheduledPromptConditioning(p.steps, webui.encode(""))]]
                                      * len(p.all_prompts), 0)
    ic = torch.zeros(len(p.all_prompts), 5, 1, 1)
    denoiser = webui.K.external.CompVisDenoiser(sd_model)
    cond = {"cond": {"c_crossattn": [c], "c_concat": [ic]}}
    uncond = {"cond": {"c_crossattn": [uc], "c_concat": [ic]}}
    return denoiser, cond, uncond, guidance_from_denoiser(denoiser, sigma0, cond, uncond)


@pytest.mark.parametrize("method", ["per_sample", "batch_wise"])
def test_the_sampler_starts_from_the_adjusted_noise(host, sd_model, script, method):
    p, processed = run(sd_model, script, on(method), batch_size=2)
    sampler = p.samplers[0]
    sigmas = sampler.get_sigmas(p, p.steps)
    _, _, _, guidance = reference_guidance(sd_model, p, float(sigmas[0]))
    config = parse_script_args(on(method)).resolve("sd1")
    expected = adjust_noise(first_pass_noise(p), guidance, config).z
    torch.testing.assert_close(sampler.started_from / sigmas[0], expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected, first_pass_noise(p))
    assert "MemSafe: method=" in processed.infotexts[0] and f"MemSafe result: {method}" in processed.infotexts[1]


def test_batch_wise_samples_its_first_steps_without_the_prompt(host, sd_model, script):
    """The whole image equals the core's reference: adjusted noise + CFG with the first K steps unconditional."""
    p, processed = run(sd_model, script, on("batch_wise"), batch_size=2)
    sigmas = p.samplers[0].get_sigmas(p, p.steps)
    denoiser, cond, uncond, guidance = reference_guidance(sd_model, p, float(sigmas[0]))
    config = parse_script_args(on("batch_wise")).resolve("sd1")
    res = adjust_noise(first_pass_noise(p), guidance, config)
    model = memsafe.CFGDenoiser(denoiser, cond, uncond, p.cfg_scale, sigmas=sigmas, uncond_steps=2,
                                uncond_images=res.uncond_images)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = webui.K.sampling.sample_euler(model, res.z * sigmas[0], sigmas, disable=True)
        without_uncond_steps = webui.K.sampling.sample_euler(
            memsafe.CFGDenoiser(denoiser, cond, uncond, p.cfg_scale), res.z * sigmas[0], sigmas, disable=True)
    images = torch.stack(processed.images)
    torch.testing.assert_close(images, expected, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(images, without_uncond_steps, atol=1e-3)
    # risk after adjustment was read from the sampler's first step, free: it equals a direct evaluation
    job = p.memsafe_job
    with torch.no_grad():
        direct = guidance(res.z).flatten(1).norm(dim=1)
    measured = torch.tensor([job.records[i].risk_after for i in range(2)])
    torch.testing.assert_close(measured, direct, rtol=1e-3, atol=1e-5)


def test_off_is_bit_identical_to_no_extension(host, sd_model, script):
    _, without = run(sd_model, script, [], batch_size=2)
    p, disabled = run(sd_model, script, [False, "per_sample"], batch_size=2)
    assert torch.equal(torch.stack(without.images), torch.stack(disabled.images))
    assert p.extra_generation_params == {} and not hasattr(p, a1111.JOB_ATTR)
    assert callbacks(host) == []


def test_a_seed_inside_a_batch_gives_the_same_image_as_alone(host, sd_model, script):
    host.shared.opts.memsafe_cache_size = 0  # compute both, no reuse
    _, batch = run(sd_model, script, on("per_sample"), batch_size=3, seed=20)
    p, alone = run(sd_model, script, on("per_sample"), batch_size=1, seed=21)
    torch.testing.assert_close(alone.images[0], batch.images[1], rtol=1e-3, atol=1e-3)
    assert "cached" not in alone.infotexts[0]


def test_rerunning_a_seed_reuses_its_adjusted_noise(host, sd_model, script):
    _, first = run(sd_model, script, on("per_sample", max_iterations=8), batch_size=2, seed=30)
    calls_before = sd_model.calls
    p, again = run(sd_model, script, on("per_sample", max_iterations=8), batch_size=1, seed=31)
    assert "cached" in again.infotexts[0]
    torch.testing.assert_close(again.images[0], first.images[1], rtol=1e-3, atol=1e-3)
    sampling_calls = p.steps * 1  # euler: one batched CFG call per step
    assert sd_model.calls - calls_before == sampling_calls + 1  # + the verification of the cached entry
    # another prompt is a different key: no reuse
    _, other = run(sd_model, script, on("per_sample", max_iterations=8), batch_size=1, seed=31, prompt="a dog")
    assert "cached" not in other.infotexts[0]


def test_sdxl_dict_conditioning(host, unet, script):
    sdxl = webui.StandInSDModel(unet)
    sdxl.is_sdxl, sdxl.is_sd1 = True, False
    host.shared.sd_model = sdxl
    p, processed = run(sdxl, script, [True, "batch_wise"], batch_size=2, prompt="a cat AND a hat")
    assert p.extra_generation_params["MemSafe preset"] == "sdxl"
    assert all("MemSafe result: batch_wise" in t for t in processed.infotexts)
    again = run(sdxl, script, [True, "batch_wise"], batch_size=2, prompt="a cat AND a hat")[1]
    assert all("cached" in t for t in again.infotexts)  # dict conditioning hashes into the cache key


def test_sgm_noise_multiplier_scales_the_start(host, sd_model, script):
    host.shared.opts.sgm_noise_multiplier = True
    p, _ = run(sd_model, script, on("per_sample"), batch_size=1)
    sampler = p.samplers[0]
    sigma0 = float(sampler.get_sigmas(p, p.steps)[0])
    _, cond, uncond, _ = reference_guidance(sd_model, p, sigma0)
    g = guidance_from_denoiser(webui.K.external.CompVisDenoiser(sd_model), sigma0, cond, uncond,
                               sgm_noise_multiplier=True)
    expected = adjust_noise(first_pass_noise(p), g, parse_script_args(on()).resolve("sd1")).z
    torch.testing.assert_close(sampler.started_from / math.sqrt(1 + sigma0**2), expected, rtol=1e-4, atol=1e-4)


def test_hires_pass_is_untouched(host, sd_model, script):
    p, _ = run(sd_model, script, on("batch_wise"), batch_size=2, enable_hr=True)
    assert torch.equal(p.hr_noise, p.hr_noise_before_hook)
    assert len(p.samplers) == 2 and callbacks(host) == []


def test_ddim_starts_from_the_adjusted_noise_unscaled(host, sd_model, script):
    p, processed = run(sd_model, script, on("per_sample"), batch_size=2, sampler_name="ddim")
    sampler = p.samplers[0]
    t0 = float(sampler.get_timesteps(p, p.steps)[-1])
    c = torch.stack([webui.encode(t) for t in p.all_prompts])
    uc = torch.stack([webui.encode("")] * 2)
    ic = torch.zeros(2, 5, 1, 1)
    guidance = memsafe.guidance_from_eps_model(sampler.model_wrap, t0, {"cond": {"c_crossattn": [c], "c_concat": [ic]}},
                                               {"cond": {"c_crossattn": [uc], "c_concat": [ic]}})
    expected = adjust_noise(first_pass_noise(p), guidance, parse_script_args(on()).resolve("sd1")).z
    torch.testing.assert_close(sampler.started_from, expected, rtol=1e-4, atol=1e-4)
    assert all(torch.isfinite(img).all() for img in processed.images)


OLDER_HOSTS = {  # what A1111 before 1.10 lacks, as the stand-in's switches
    "1.9": {"has_sampling_hook": False},
    "1.8": {"has_sampling_hook": False, "infotext_callables": False, "callbacks_take_names": False},
    "1.6-1.7": {"has_sampling_hook": False, "infotext_callables": False, "callbacks_take_names": False,
                "callbacks_name_the_denoiser": False, "timesteps_samplers_set_model_wrap": False},
}


@pytest.mark.parametrize("version", OLDER_HOSTS)
@pytest.mark.parametrize("sampler_name", ["sample_euler_ancestral", "ddim"])
@pytest.mark.parametrize("method", ["batch_wise", "per_sample"])
def test_older_webuis_make_the_same_images_and_infotexts(sd_model, version, sampler_name, method):
    """The unconditional first steps, the risk measured at the first step and the per-image texts work on every
    supported WebUI; only 1.6-1.7 pay one model call more (their cfg_denoiser callback does not say whose call it
    is, so the per-sample method's last check cannot stand in for the first call)."""
    webui.install(sd_model)
    try:
        _, new = run(sd_model, webui.load_script().MemSafeScript(), on(method), batch_size=2, sampler_name=sampler_name)
        calls_new, sd_model.calls = sd_model.calls, 0
        host = webui.install(sd_model, **OLDER_HOSTS[version])
        p, old = run(sd_model, webui.load_script().MemSafeScript(), on(method), batch_size=2, sampler_name=sampler_name)
        assert isinstance(p.rng, a1111._OneShotNoise)  # no process_before_every_sampling: the noise comes from p.rng
        torch.testing.assert_close(torch.stack(old.images), torch.stack(new.images), rtol=1e-4, atol=1e-4)
        assert old.infotexts == new.infotexts and all("->" in r for r in p.extra_generation_params["MemSafe result"])
        reused = method == "per_sample"  # batch-wise's last evaluation is not at the noise it hands the sampler
        assert sd_model.calls == calls_new + (1 if reused and version == "1.6-1.7" else 0)
        assert callbacks(host) == []
    finally:
        webui.uninstall()


@pytest.mark.parametrize("checkpointing", ["never", "always"])
def test_per_sample_runs_on_a_unet_with_ldms_own_checkpointing_and_leaves_it_on(unet, checkpointing):
    """A1111 1.6-1.9 build the UNet with ldm's gradient checkpointing on, whose backward differentiates the frozen
    weights: MemSafe turns it off while it adjusts (the same images as without it) and back on afterwards."""
    plain, ldm = webui.StandInSDModel(unet), webui.StandInSDModel(webui.LdmCheckpointedUNet(unet))
    images = []
    for sd_model in (plain, ldm):
        host = webui.install(sd_model, has_sampling_hook=False, memsafe_checkpointing=checkpointing)
        try:
            p, processed = run(sd_model, webui.load_script().MemSafeScript(), on("per_sample"), batch_size=2)
            assert all("MemSafe result: per_sample" in t for t in processed.infotexts) and callbacks(host) == []
            images.append(torch.stack(processed.images))
        finally:
            webui.uninstall()
    torch.testing.assert_close(images[1], images[0], rtol=1e-4, atol=1e-4)
    assert ldm.unet.use_checkpoint is True and ldm.unet.inner.checkpoint is True


def test_callbacks_are_removed_after_an_exception(host, sd_model, script):
    p = make_p(sd_model, script, on("batch_wise"), batch_size=2)
    original = webui.StandInKDiffusionSampler.sample

    def crash(self, *a, **k):
        assert len(callbacks(host)) == 2  # installed for this job...
        raise RuntimeError("out of memory (simulated)")

    webui.StandInKDiffusionSampler.sample = crash
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            webui.run_job(p)
    finally:
        webui.StandInKDiffusionSampler.sample = original
    assert callbacks(host) == [] and p.closed  # ...and gone although postprocess never ran


def test_callbacks_ignore_other_jobs_samplers(host, sd_model, script):
    """A nested job (ADetailer) or the hires pass sample with another CFG denoiser: the callbacks stay inert."""
    p = make_p(sd_model, script, on("batch_wise"), batch_size=1)
    original = webui.StandInKDiffusionSampler.sample
    seen = []

    def nested_job_first(self, *a, **k):
        other = webui.StandInKDiffusionSampler("sample_euler", sd_model)
        x_out = torch.ones(2, 4, 8, 8)
        x_out[1] = 5.0
        params = webui.CFGDenoiserParams(x_out, None, torch.tensor([100.0]), 0, 0, None, None, other.model_wrap_cfg)
        host.script_callbacks.cfg_denoiser_callback(params)
        host.script_callbacks.cfg_denoised_callback(webui.CFGDenoisedParams(x_out, 0, 0, None))
        seen.append((len(callbacks(host)), bool(x_out[0].eq(1.0).all())))
        return original(self, *a, **k)

    webui.StandInKDiffusionSampler.sample = nested_job_first
    try:
        processed = webui.run_job(p)
    finally:
        webui.StandInKDiffusionSampler.sample = original
    assert seen == [(2, True)]  # callbacks were live, yet the other sampler's x_out stayed untouched
    assert "MemSafe result: batch_wise" in processed.infotexts[0]
    assert callbacks(host) == [] and host.script_callbacks.errors == []


@pytest.mark.parametrize(("kw", "args", "match"), [
    ({}, on(rho=-1.0), "rho"),
    ({"cfg_scale": 1.0}, on(), "CFG scale"),
    ({"steps": 2}, on("batch_wise", uncond_steps=2), "uncond_steps"),
])
def test_requests_that_cannot_be_mitigated_stop_the_job(host, sd_model, script, kw, args, match):
    p = make_p(sd_model, script, args, batch_size=1, **kw)
    with pytest.raises(a1111.MemSafeError, match=match):
        webui.run_job(p)
    assert callbacks(host) == []


def test_model_nan_fails_closed_and_the_continue_policy_says_so(host, unet, script):
    broken = webui.StandInSDModel(unet, fail_with_nan=True)
    with pytest.raises(a1111.MemSafeError, match="NaN"):
        run(broken, script, on("per_sample"), batch_size=1)
    host.shared.opts.memsafe_fail_policy = a1111.FAIL_CONTINUE
    p, processed = run(broken, script, on("per_sample"), batch_size=1)
    assert "MemSafe result: NOT APPLIED" in processed.infotexts[0]
    assert "NOT APPLIED" in processed.comments


def test_interrupt_stops_the_optimizer_within_an_iteration(host, sd_model, script):
    class State:
        def __init__(self):
            self.interrupted = self.skipped = False
            self.sampling_step = self.sampling_steps = 0
            self.updates = 0

        @property
        def textinfo(self):
            return ""

        @textinfo.setter
        def textinfo(self, value):
            self.updates += 1
            self.interrupted = self.updates >= 2  # the user presses Interrupt during iteration 2

    host.shared.state = State()
    p, processed = run(sd_model, script, on("per_sample", max_iterations=500), batch_size=1)
    assert host.shared.state.updates == 2 and sd_model.calls <= 3
    assert "MemSafe result: interrupted" in processed.infotexts[0]
    assert callbacks(host) == []


def test_per_image_results_warnings_and_api_lists(host, sd_model, script):
    p, processed = run(sd_model, script, on("per_sample", max_iterations=2, target=0.0), batch_size=2, n_iter=2)
    results = p.extra_generation_params["MemSafe result"]
    warnings = p.extra_generation_params["MemSafe warning"]
    assert isinstance(results, list) and len(results) == 4 and all(r.startswith("per_sample") for r in results)
    assert len(warnings) == 4 and all("still at risk" in w for w in warnings)
    assert "MemSafe warning: still at risk" in processed.infotexts[3]
    assert processed.comments.count("MemSafe: image") == 4
    # each image's infotext carries its own result: A1111 makes them per batch, with the index within the batch
    # (processing.py L1026-1027), and after the job with the index within the job (L609-610)
    assert len(set(results)) == 4
    for i, text in enumerate(processed.infotexts):
        assert f"Seed: {p.all_seeds[i]}," in text and f"MemSafe result: {results[i]}," in text
    for i in range(4):
        assert f"MemSafe result: {results[i]}," in webui.create_infotext(p, p.all_prompts, p.all_seeds, index=i)
    main = webui.create_infotext(p, p.prompts, p.seeds, use_main_prompt=True)  # the grid's (L1123): image 1's
    assert f"MemSafe result: {results[0]}," in main


def test_a_webui_before_1_9_gets_each_images_own_texts_as_plain_values(sd_model):
    """A1111 1.6-1.8 write infotext values as they are (no per-image lists or callables): MemSafe writes each image's
    texts just before its infotext is made, and the images come out as on 1.10 with the same infotexts."""
    args = on("per_sample", max_iterations=2, target=0.0)
    webui.install(sd_model)
    try:
        _, new = run(sd_model, webui.load_script().MemSafeScript(), args, batch_size=2, n_iter=2)
        host = webui.install(sd_model, **OLDER_HOSTS["1.8"])
        assert not a1111.infotext_calls_values()
        p = make_p(sd_model, webui.load_script().MemSafeScript(), args, batch_size=2, n_iter=2)
        sample, made_while_sampling = p.sample, []

        def sample_and_save_before_hires(*a, **k):  # the hires pass's "before highres fix" save (v1.8.0 L1292)
            samples = sample(*a, **k)
            made_while_sampling.append(host.processing.create_infotext(p, p.all_prompts, p.all_seeds, index=0))
            return samples

        p.sample = sample_and_save_before_hires
        old = webui.run_job(p)
        assert ["MemSafe result" in t for t in made_while_sampling] == [False, False]  # not the last batch's text
        assert old.infotexts == new.infotexts and "bound method" not in "".join(old.infotexts)
        results = p.extra_generation_params["MemSafe result"]
        assert len(set(results)) == 4 and all(f"MemSafe result: {r}," in t for r, t in zip(results, old.infotexts))
        assert all("MemSafe warning: still at risk" in t for t in old.infotexts)
        assert old.comments == new.comments and old.comments.count("MemSafe: image") == 4
        torch.testing.assert_close(torch.stack(old.images), torch.stack(new.images), rtol=1e-4, atol=1e-4)
        host.shared.opts.memsafe_fail_policy = a1111.FAIL_CONTINUE  # the job-wide text is a plain value too
        _, skipped = run(sd_model, webui.load_script().MemSafeScript(), on("per_sample", lr=-1.0), batch_size=2)
        assert all("MemSafe result: NOT APPLIED (lr" in t for t in skipped.infotexts)
        assert callbacks(host) == []
    finally:
        webui.uninstall()


def test_noise_pushed_out_of_distribution_is_warned_of_also_from_the_cache(host, sd_model, script):
    far = on("per_sample", optimizer="adamw", lr=1.0, max_iterations=3)  # each element moves by about 1 per step
    p, processed = run(sd_model, script, far, batch_size=2, seed=40)
    warnings = p.extra_generation_params["MemSafe warning"]
    assert len(warnings) == 2 and all("noise out of distribution after per_sample (RMS" in w for w in warnings)
    rms = memsafe.noise_rms(p.samplers[0].started_from / p.samplers[0].get_sigmas(p, p.steps)[0])
    limit = memsafe.noise_rms_limit(4 * 8 * 8)  # 64 px: the band of a latent this small (1.177)
    assert (rms > limit).all()
    assert f"RMS {float(rms[1]):.3f} where Gaussian noise has 1, allowed {1 / limit:.3f}-{limit:.3f})" in warnings[1]
    assert "the image may be distorted or off-prompt" in warnings[1]
    assert "MemSafe: image 2 (seed 41): " in processed.comments and "noise out of distribution" in processed.comments
    _, again = run(sd_model, script, far, batch_size=1, seed=41)
    assert "cached" in again.infotexts[0] and "noise out of distribution" in again.infotexts[0]
    near = on("per_sample", optimizer="adamw", lr=0.001, max_iterations=3)
    q, _ = run(sd_model, script, near, batch_size=2, seed=40)
    assert all("noise out of distribution" not in w for w in q.extra_generation_params["MemSafe warning"])


def test_auto_leaves_low_risk_images_alone(host, sd_model, script):
    p, processed = run(sd_model, script, on("auto", risk_threshold=1e5), batch_size=2)
    assert all("MemSafe result: none" in t for t in processed.infotexts)
    torch.testing.assert_close(p.samplers[0].started_from / p.samplers[0].get_sigmas(p, p.steps)[0],
                               first_pass_noise(p))


@pytest.mark.parametrize("sampler", ["sample_euler", "ddim"])
def test_auto_not_at_risk_costs_no_extra_model_call(host, sd_model, script, sampler):
    host.shared.opts.memsafe_cache_size = 0
    before = sd_model.calls
    _, off = run(sd_model, script, [], batch_size=2, seed=50, prompt="a cat AND a hat :0.5", sampler_name=sampler)
    calls_off = sd_model.calls - before
    before = sd_model.calls
    p, auto = run(sd_model, script, on("auto", risk_threshold=1e5), batch_size=2, n_iter=2, seed=50,
                  prompt="a cat AND a hat :0.5", sampler_name=sampler)
    assert all("MemSafe result: none" in t for t in auto.infotexts)
    # each batch's risk evaluation was its sampler's first model call: the same UNet calls as without MemSafe
    assert sd_model.calls - before == 2 * calls_off
    assert torch.equal(torch.stack(auto.images[:2]), torch.stack(off.images))  # bit-identical, not just close
    wrappers = [s.model_wrap_cfg.model_wrap for s in p.samplers]
    assert all(isinstance(w, (webui.K.external.CompVisDenoiser, webui.StandInTimestepsDenoiser))
               for w in wrappers)  # the model is back
    assert callbacks(host) == []


@pytest.mark.parametrize(("prompt", "sampler"),
                         [("a cat", "sample_euler"), ("a cat AND a hat :0.5", "sample_euler"), ("a cat", "ddim")])
def test_per_sample_last_check_is_the_first_sampling_step(host, sd_model, script, monkeypatch, prompt, sampler):
    host.shared.opts.memsafe_cache_size = 0
    images, calls = {}, {}
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(Guidance, "call_at", lambda self, z: None)
        before = sd_model.calls
        p, images[reuse] = run(sd_model, script, on("per_sample"), batch_size=1, n_iter=2, seed=60, prompt=prompt,
                               sampler_name=sampler)
        calls[reuse] = sd_model.calls - before
        assert all(isinstance(s.model_wrap_cfg.model_wrap, (webui.K.external.CompVisDenoiser,
                                                             webui.StandInTimestepsDenoiser)) for s in p.samplers)
        assert callbacks(host) == []
    assert all("MemSafe result: per_sample" in t for t in images[True].infotexts)
    # every batch's last check (under autograd) was its sampler's first model call: one call saved per batch
    assert calls[False] - calls[True] == 2
    assert torch.equal(torch.stack(images[True].images), torch.stack(images[False].images))  # bit-identical


def test_per_sample_checks_one_image_per_call_and_the_sampler_takes_them_as_its_first_step(host, sd_model, script):
    host.shared.opts.memsafe_cache_size = 0
    calls, images = {}, {}
    for per_call in (0, 1):  # the whole batch of 2 per model call, or one image
        host.shared.opts.memsafe_images_per_call = per_call
        before = sd_model.calls
        p, images[per_call] = run(sd_model, script, on("per_sample", max_iterations=1), batch_size=2, seed=61)
        calls[per_call] = sd_model.calls - before
    # both images stop after 1 step: 2 checks. Whole batch: 2 calls, and the last is the sampler's first step.
    # One image per call: 4 calls with 2 rows each; the last two (each image's final check) make up the sampler's
    # 4-row first call, equal to it up to batch-size round-off, so it is not made either.
    assert (calls[0], calls[1]) == (2 + p.steps - 1, 4 + p.steps - 1)
    torch.testing.assert_close(images[1].images, images[0].images, rtol=1e-3, atol=1e-3)


def test_reuse_stand_in_runs_the_model_for_any_other_call_and_puts_it_back():
    from memsafe.guidance import DenoiserCall

    class Owner(torch.nn.Module):
        def __init__(self, model_wrap):
            super().__init__()
            self.model_wrap = model_wrap

    calls = []

    class Model(torch.nn.Module):
        tag = "the model's own attribute"

        def forward(self, x, sigma, cond):
            calls.append(x)
            return x * 2

    model = Model()
    owner = Owner(model)
    x, sigma, cond = torch.ones(2, 4, 1, 1), torch.ones(2), {"c_crossattn": [torch.zeros(2, 3)]}
    recorded = DenoiserCall(x, sigma, {"cond": cond}, torch.full_like(x, 7.0))
    stand_in = a1111.ReuseFirstCall(owner, recorded)
    assert owner.model_wrap is stand_in and stand_in.tag == Model.tag  # reads pass through to the model
    out = owner.model_wrap(x + 1, sigma, cond=cond)  # another x: the model runs
    assert torch.equal(out, (x + 1) * 2) and len(calls) == 1 and owner.model_wrap is model
    stand_in = a1111.ReuseFirstCall(owner, recorded)
    other = {"c_crossattn": [torch.ones(2, 3)]}
    out = owner.model_wrap(x, sigma, cond=other)  # other conditioning: the model runs
    assert len(calls) == 2 and owner.model_wrap is model
    stand_in = a1111.ReuseFirstCall(owner, recorded)
    out = owner.model_wrap(x, sigma, cond=cond)  # the same call: its recorded output, once
    assert torch.equal(out, recorded.denoised) and out is not recorded.denoised
    assert len(calls) == 2 and owner.model_wrap is model  # the model did not run
    stand_in = a1111.ReuseFirstCall(owner, recorded)
    stand_in.restore()  # never called (an interrupt): the job's end puts the model back
    assert owner.model_wrap is model


def test_and_prompts_and_separate_cond_uncond_calls(host, sd_model, script):
    host.shared.opts.batch_cond_uncond = False
    p, processed = run(sd_model, script, on("per_sample"), batch_size=2, prompt="a red circle AND a hat :0.5")
    assert all("MemSafe result: per_sample" in t for t in processed.infotexts)


def test_xyz_axis_values_override_the_arguments(host, sd_model, script):
    p = make_p(sd_model, script, on("per_sample"), batch_size=1)
    p.memsafe_target = 0.25
    p.memsafe_method = "batch_wise"
    processed = webui.run_job(p)
    config = MitigationConfig.from_string(p.extra_generation_params["MemSafe"])
    assert config.method == "batch_wise" and config.target == 0.25
    assert "MemSafe result: batch_wise" in processed.infotexts[0]
    p = make_p(sd_model, script, on("per_sample"), batch_size=1)
    p.memsafe_optimizer = "adamw"  # the per-sample step axis: the default Polyak against the paper's AdamW
    webui.run_job(p)
    assert MitigationConfig.from_string(p.extra_generation_params["MemSafe"]).optimizer == "adamw"
    p = make_p(sd_model, script, on("per_sample"), batch_size=1)
    p.memsafe_hold_norm_steps = 2  # the held-norm axis
    webui.run_job(p)
    assert MitigationConfig.from_string(p.extra_generation_params["MemSafe"]).hold_norm_steps == 2
    p = make_p(sd_model, script, on("per_sample"), batch_size=1)
    p.memsafe_enabled = "false"
    webui.run_job(p)
    assert p.extra_generation_params == {}


def test_infotext_round_trip_restores_the_exact_config(host, sd_model, script):
    components = script.ui(False)
    assert len(components) == len(ARG_NAMES)
    p, processed = run(sd_model, script, on("per_sample", lr=0.0123, target=0.5, hold_norm_steps=3), batch_size=1)
    pasted = {"MemSafe": p.extra_generation_params["MemSafe"]}
    args = [read(pasted) for _, read in script.infotext_fields]
    restored = parse_script_args(args).resolve("sd1")
    assert restored == MitigationConfig.from_string(p.extra_generation_params["MemSafe"])
    assert restored.lr == 0.0123 and restored.target == 0.5 and restored.method == "per_sample"
    assert restored.hold_norm_steps == 3
    assert [read({}) for _, read in script.infotext_fields][0] is False  # no MemSafe in the infotext: off


def test_pasting_an_infotext_from_before_the_default_step_changed_restores_adamw(host, sd_model, script):
    script.ui(False)
    p, _ = run(sd_model, script, on("per_sample"), batch_size=1)
    assert "optimizer=polyak" in p.extra_generation_params["MemSafe"]  # the default is written out
    old = {"MemSafe": "method=per_sample;target=0.5"}  # memsafe 0.1.0 left out its default, AdamW
    restored = parse_script_args([read(old) for _, read in script.infotext_fields]).resolve("sd1")
    assert restored.optimizer == "adamw" and restored.target == 0.5


def test_img2img_ui_has_no_arguments(host, script):
    assert script.ui(True) == []


def test_the_script_registers_startup_callbacks_only(host):
    webui.load_script()
    assert sorted(h for h, _ in host.script_callbacks.startup) == ["on_app_started", "on_before_ui", "on_ui_settings"]
    assert callbacks(host) == []


def test_model_family_detection():
    ns = webui.types.SimpleNamespace
    assert a1111.model_family(ns(is_sdxl=True)) == "sdxl"
    assert a1111.model_family(ns(is_sdxl=False, is_sd2=True, parameterization="v")) == "sd2-v"
    assert a1111.model_family(ns(is_sdxl=False, is_sd2=True, parameterization="eps")) == "sd2"
    assert a1111.model_family(ns()) == "sd1"


def test_noise_cache_is_bounded():
    cache = a1111.NoiseCache(capacity=2)
    record = a1111.ImageRecord("per_sample", 1.0)
    for key in "abc":
        cache.put(key, a1111.CachedNoise(torch.zeros(1), 1.0, record))
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") is not None
    cache.resize(0)
    cache.put("d", a1111.CachedNoise(torch.zeros(1), 1.0, record))
    assert len(cache) == 0
    assert math.isnan(a1111.ImageRecord("batch_wise", 2.0).risk_after)


def test_checkpointing_setting_same_image_and_unet_restored(host, sd_model, script, unet, monkeypatch, caplog):
    import types

    import memsafe.checkpointing as ckpt
    import memsafe.methods as methods

    recomputed = []
    original = ckpt._RecomputeByRows.run  # the weights are frozen while adjusting: the row-by-row recompute
    monkeypatch.setattr(ckpt._RecomputeByRows, "run", staticmethod(
        lambda fn, args, kwargs, *rest: recomputed.append(fn) or original(fn, args, kwargs, *rest)))
    host.shared.opts.memsafe_cache_size = 0
    host.shared.opts.memsafe_memory_budget_mb = 1  # below what recomputing every part needs: every part
    images = {}
    for mode in ("never", "always", "on_oom", "budget"):
        host.shared.opts.memsafe_checkpointing = mode
        recomputed.clear()
        caplog.clear()
        with caplog.at_level("INFO", logger="memsafe"):
            _, images[mode] = run(sd_model, script, on("per_sample"), batch_size=2, seed=40)
        assert bool(recomputed) == (mode in ("always", "budget")), mode
        assert ("within a budget of 1 MiB" in caplog.text) == (mode == "budget"), mode
        assert all("forward" not in b.__dict__ for b in ckpt.checkpoint_blocks(unet))
    for mode in ("always", "budget"):
        torch.testing.assert_close(images[mode].images, images["never"].images, rtol=1e-4, atol=1e-4)
    # --lowvram: per-block device hooks would not run on recompute, so nothing is checkpointed (the weights are
    # still frozen while adjusting: that needs no hook)
    host.shared.opts.memsafe_checkpointing = "always"
    host.shared.cmd_opts = types.SimpleNamespace(lowvram=True)
    recomputed.clear()
    frozen_seen = []
    original_frozen = ckpt.frozen_parameters
    monkeypatch.setattr(methods, "frozen_parameters", lambda m: frozen_seen.append(m) or original_frozen(m))
    _, lowvram = run(sd_model, script, on("per_sample"), batch_size=2, seed=40)
    assert not recomputed and a1111.checkpointing_setting() == "never" and frozen_seen == [unet]
    torch.testing.assert_close(lowvram.images, images["never"].images, rtol=1e-4, atol=1e-4)


def test_memory_budget_setting(host):
    for value, expected in ((0, None), (512, 512 * 2**20), (0.5, 2**19), ("64", 64 * 2**20), (None, None)):
        host.shared.opts.memsafe_memory_budget_mb = value
        assert a1111.memory_budget() == expected, value
    for value in (-1, "abc", float("nan"), float("inf"), True):
        host.shared.opts.memsafe_memory_budget_mb = value
        with pytest.raises(ConfigError, match="memsafe_memory_budget_mb.*a number of MiB >= 0"):
            a1111.memory_budget()


@pytest.mark.parametrize(("name", "value", "allowed"), [
    ("memsafe_checkpointing", "sometimes", "one of on_oom, always, never, budget"),
    ("memsafe_memory_budget_mb", -5, "a number of MiB >= 0"),
    ("memsafe_images_per_call", 2.5, "a whole number >= 0"),
    ("memsafe_images_per_call", "x", "a whole number >= 0"),
    ("memsafe_cache_size", 10**9, "a whole number of images from 0 .off. to 1024"),
])
def test_a_bad_setting_stops_the_job_naming_it_or_is_reported_with_the_continue_policy(
        host, sd_model, script, name, value, allowed):
    # the options API stores any value (POST /sdapi/v1/options): the job says which setting is wrong
    setattr(host.shared.opts, name, value)
    with pytest.raises(a1111.MemSafeError, match=f"setting {name}: {value!r} is not {allowed}"):
        run(sd_model, script, on("per_sample"), batch_size=1)
    assert callbacks(host) == []
    host.shared.opts.memsafe_fail_policy = a1111.FAIL_CONTINUE
    _, processed = run(sd_model, script, on("per_sample"), batch_size=1)
    assert f"MemSafe result: NOT APPLIED (setting {name}" in processed.infotexts[0]


def test_an_unknown_fail_policy_stops_the_job_naming_the_setting_and_its_choices(host, sd_model, script):
    # fail closed: a policy that is neither choice must not quietly decide whether an image is mitigated
    host.shared.opts.memsafe_fail_policy = "Continue"
    with pytest.raises(a1111.MemSafeError, match="setting memsafe_fail_policy: 'Continue' is not one of "
                                                 "'Stop the job', 'Continue unmitigated"):
        run(sd_model, script, on("per_sample"), batch_size=1)
    assert callbacks(host) == []
    assert a1111.fail_policy() == a1111.FAIL_STOP


def test_images_per_call_setting_caps_the_per_sample_model_calls(host, sd_model, script, monkeypatch):
    rows_with_grad = []
    apply_model = sd_model.apply_model

    def recording(x, t, cond):
        if torch.is_grad_enabled() and x.requires_grad:
            rows_with_grad.append(x.shape[0])
        return apply_model(x, t, cond)

    monkeypatch.setattr(sd_model, "apply_model", recording)
    host.shared.opts.memsafe_cache_size = 0
    images = {}
    for setting in (0, 1, None):
        host.shared.opts.memsafe_images_per_call = setting
        rows_with_grad.clear()
        _, images[setting] = run(sd_model, script, on("per_sample"), batch_size=2, seed=45)
        # cond + uncond rows of every image in the call: 4 for the whole batch of 2, 2 for one image
        assert rows_with_grad and max(rows_with_grad) == (2 if setting == 1 else 4), setting
    # the same images up to batch round-off (as a seed alone against inside a batch)
    torch.testing.assert_close(images[1].images, images[0].images, rtol=1e-3, atol=1e-3)
    assert a1111.images_per_call() is None  # unset (an empty field): the whole batch
