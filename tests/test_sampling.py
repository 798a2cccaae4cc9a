"""The adjusted noise through real k-diffusion samplers, as A1111 runs them."""

import pytest
import torch

import memsafe
from helpers import SIGMA0
from memsafe import CFGDenoiser, MitigationConfig, adjust_noise, guidance_from_denoiser

STEPS = 8
K = 3


class Recorder:
    """Records the sigma of every model call made by a sampler."""

    def __init__(self, inner):
        self.inner, self.sigmas = inner, []

    def __call__(self, x, sigma, **kw):
        self.sigmas.append(float(sigma[0]))
        return self.inner(x, sigma, **kw)


@pytest.mark.parametrize(
    ("sampler", "expected_uncond_calls"),
    [
        ("sample_euler", K),
        ("sample_euler_ancestral", K),
        ("sample_dpmpp_2m", K),
        (
            "sample_heun",
            2 * K - 1,
        ),  # K predictors + the correctors of steps 0..K-2 (step K-1's sits at sigma_K)
        ("sample_dpm_2", 2 * K),  # each step also evaluates at a midpoint above sigma_{i+1}
    ],
)
def test_uncond_decision_follows_the_noise_level_for_every_sampler(
    kd, denoiser, batch, sampler, expected_uncond_calls
):
    z, cond, uncond = batch
    sigmas = denoiser.get_sigmas(STEPS)
    model = CFGDenoiser(
        denoiser,
        {"cond": cond},
        {"cond": uncond},
        7.0,
        sigmas=sigmas,
        uncond_steps=K,
        uncond_images=torch.ones(3, dtype=torch.bool),
    )
    rec = Recorder(model)
    torch.manual_seed(0)
    with torch.no_grad():
        getattr(kd.sampling, sampler)(rec, z * sigmas[0], sigmas, disable=True)
    flags = [memsafe.uncond_only(s, sigmas, K) for s in rec.sigmas]
    assert sum(flags) == expected_uncond_calls
    assert flags[:expected_uncond_calls] == [True] * expected_uncond_calls  # all at the start


@pytest.mark.parametrize(
    "sampler", ["sample_euler", "sample_euler_ancestral", "sample_dpmpp_2m", "sample_heun"]
)
def test_sampler_starts_from_the_adjusted_noise_and_unguided_steps_use_uncond(kd, denoiser, batch, sampler):
    z, cond, uncond = batch
    sigmas = denoiser.get_sigmas(STEPS)
    g = guidance_from_denoiser(
        denoiser, float(sigmas[0]), {"cond": cond}, {"cond": uncond}, guidance_scale=7.0
    )
    res = adjust_noise(
        z, g, MitigationConfig(method="batch_wise", rho=3.0, uncond_steps=K, scale_with_size=False)
    )
    model = CFGDenoiser(
        denoiser,
        {"cond": cond},
        {"cond": uncond},
        7.0,
        sigmas=sigmas,
        uncond_steps=K,
        uncond_images=res.uncond_images,
    )
    first_calls = []

    def spy(x, sigma, **kw):
        out = model(x, sigma, **kw)
        if not first_calls:
            first_calls.append((x.clone(), out.clone()))
        return out

    torch.manual_seed(0)
    with torch.no_grad():
        images = getattr(kd.sampling, sampler)(spy, res.z * sigmas[0], sigmas, disable=True)
        x0, out0 = first_calls[0]
        torch.testing.assert_close(x0, res.z * sigmas[0])
        # step 0 is unconditional: the same as denoising with the uncond conditioning alone
        torch.testing.assert_close(
            out0, denoiser(x0, sigmas[:1].expand(3), cond=uncond), rtol=1e-4, atol=1e-4
        )
    assert torch.isfinite(images).all() and images.shape == z.shape


@pytest.mark.parametrize("sampler", ["sample_euler", "sample_dpmpp_2m", "sample_heun"])
def test_a_seed_inside_a_batch_gives_the_same_image_as_alone(kd, denoiser, batch, sampler):
    z, cond, uncond = batch
    sigmas = denoiser.get_sigmas(STEPS)
    cfg = MitigationConfig(method="per_sample", lr=0.05, target=0.0, max_iterations=4, scale_with_size=False)

    def generate(index):
        g = guidance_from_denoiser(denoiser, float(sigmas[0]), {"cond": cond[index]}, {"cond": uncond[index]})
        res = adjust_noise(z[index], g, cfg)
        model = CFGDenoiser(denoiser, {"cond": cond[index]}, {"cond": uncond[index]}, 7.0)
        with torch.no_grad():
            return getattr(kd.sampling, sampler)(model, res.z * sigmas[0], sigmas, disable=True)

    together = generate(torch.arange(3))
    alone = generate(torch.tensor([1]))
    torch.testing.assert_close(alone[0], together[1], rtol=1e-3, atol=1e-3)


def test_off_is_bit_identical_to_sampling_without_memsafe(kd, denoiser, batch):
    z, cond, uncond = batch
    sigmas = denoiser.get_sigmas(STEPS)
    g = guidance_from_denoiser(denoiser, float(sigmas[0]), {"cond": cond}, {"cond": uncond})
    res = adjust_noise(z, g, MitigationConfig(method="off"))
    plain = CFGDenoiser(denoiser, {"cond": cond}, {"cond": uncond}, 7.0)
    with_off = CFGDenoiser(
        denoiser,
        {"cond": cond},
        {"cond": uncond},
        7.0,
        sigmas=sigmas,
        uncond_steps=K,
        uncond_images=res.uncond_images,
    )
    with torch.no_grad():
        a = kd.sampling.sample_euler(plain, z * sigmas[0], sigmas, disable=True)
        b = kd.sampling.sample_euler(with_off, res.z * sigmas[0], sigmas, disable=True)
    assert torch.equal(a, b)


def test_auto_below_threshold_reuses_its_risk_evaluation_as_the_first_step(kd, denoiser, batch):
    z, cond, uncond = batch
    sigmas = denoiser.get_sigmas(STEPS)
    g = guidance_from_denoiser(denoiser, float(sigmas[0]), {"cond": cond}, {"cond": uncond})
    res = adjust_noise(z, g, MitigationConfig(method="auto", risk_threshold=1e5, scale_with_size=False))
    assert res.applied == ["none"] * 3 and g.calls.calls == 1
    plain = CFGDenoiser(denoiser, {"cond": cond}, {"cond": uncond}, 7.0)
    reusing = CFGDenoiser(denoiser, {"cond": cond}, {"cond": uncond}, 7.0, reuse=g)
    with torch.no_grad():
        a = kd.sampling.sample_euler(plain, z * sigmas[0], sigmas, disable=True)
        b = kd.sampling.sample_euler(reusing, res.z * sigmas[0], sigmas, disable=True)
    assert torch.equal(a, b)  # bit-identical to sampling without memsafe...
    assert (plain.calls, reusing.calls, reusing.reused) == (STEPS, STEPS - 1, 1)  # ...at zero extra model calls


def test_reuse_is_refused_when_the_call_differs(kd, denoiser, batch):
    z, cond, uncond = batch
    sigmas = denoiser.get_sigmas(STEPS)
    g = guidance_from_denoiser(denoiser, float(sigmas[0]), {"cond": cond}, {"cond": uncond})
    adjust_noise(z, g, MitigationConfig(method="auto", risk_threshold=1e5, scale_with_size=False))
    other_cond = CFGDenoiser(denoiser, {"cond": uncond}, {"cond": uncond}, 7.0, reuse=g)
    moved = CFGDenoiser(denoiser, {"cond": cond}, {"cond": uncond}, 7.0, reuse=g)
    with torch.no_grad():
        other_cond(z * sigmas[0], sigmas[:1].expand(3))
        moved((z + 1e-3) * sigmas[0], sigmas[:1].expand(3))
    assert other_cond.reused == 0 and moved.reused == 0
    assert other_cond.reuse is None and moved.reuse is None  # given up after the first call, not compared each step


def _sample(kd, denoiser, cond, uncond, z, sigmas, reuse=None, **cfg):
    model = CFGDenoiser(denoiser, {"cond": cond}, {"cond": uncond}, 7.0, sigmas=sigmas, reuse=reuse, **cfg)
    with torch.no_grad():
        images = kd.sampling.sample_euler(model, z * sigmas[0], sigmas, disable=True)
    return images, model


@pytest.mark.parametrize(
    ("optimizer", "gradient", "images", "max_batch", "stop_together"),
    [("adamw", "autograd", 3, None, True), ("polyak", "autograd", 1, None, True),
     ("adamw", "finite_difference", 3, None, True), ("adamw", "autograd", 3, None, False),
     ("polyak", "autograd", 3, 1, True)],
)
def test_per_sample_last_check_is_the_first_sampling_step(kd, denoiser, unet, batch, optimizer, gradient, images,
                                                          max_batch, stop_together):
    z, cond, uncond = (t[:images] for t in batch)
    sigmas = denoiser.get_sigmas(STEPS)
    g = guidance_from_denoiser(denoiser, float(sigmas[0]), {"cond": cond}, {"cond": uncond})
    risk = memsafe.risk_score(z, g)
    # an unreachable target stops every image at max_iterations, in one call; one between the images' risks
    # stops them after different numbers of iterations, the last ones in smaller calls
    target = 0.0 if stop_together else float(risk.median()) * 0.8
    config = MitigationConfig(method="per_sample", scale_with_size=False, target=target, optimizer=optimizer,
                              gradient=gradient, max_iterations=4, lr=0.2)
    res = adjust_noise(z, g, config, model=unet, max_batch=max_batch)
    assert (len(set(res.iterations.tolist())) == 1) == stop_together
    same_bits = stop_together and (max_batch is None or images == 1)
    assert g.call_at(res.z).same_bits == same_bits
    reused, with_reuse = _sample(kd, denoiser, cond, uncond, res.z, sigmas, reuse=g)
    fresh, without = _sample(kd, denoiser, cond, uncond, res.z, sigmas)
    # every image's last check is at its returned noise: the sampler's first call is never made again
    assert (without.calls, with_reuse.calls, with_reuse.reused) == (STEPS, STEPS - 1, 1)
    if same_bits:  # from one call as large as the sampler's, run under autograd: the same kernels, the same bits
        assert torch.equal(reused, fresh)
    else:  # rows from smaller calls: another batch size may round differently, nothing more
        torch.testing.assert_close(reused, fresh, rtol=1e-4, atol=1e-4)


def test_auto_on_a_mixed_batch_reuses_the_risk_evaluation_and_the_adjusted_images_last_checks(kd, denoiser, unet,
                                                                                             batch):
    z, cond, uncond = batch
    sigmas = denoiser.get_sigmas(STEPS)
    g = guidance_from_denoiser(denoiser, float(sigmas[0]), {"cond": cond}, {"cond": uncond})
    risk = memsafe.risk_score(z, g)
    threshold = float(risk.median())  # the images at or above it are adjusted, the others keep their noise
    config = MitigationConfig(method="auto", auto_method="per_sample", scale_with_size=False,
                              risk_threshold=threshold, target=0.0, max_iterations=2, lr=0.2)
    res = adjust_noise(z, g, config, model=unet)
    assert "none" in res.applied and "per_sample" in res.applied
    reused, with_reuse = _sample(kd, denoiser, cond, uncond, res.z, sigmas, reuse=g)
    fresh, _ = _sample(kd, denoiser, cond, uncond, res.z, sigmas)
    # the images left alone were last evaluated by the risk call, the adjusted ones by their last checks, which had
    # fewer rows than the sampler's call: taken, equal up to batch-size round-off
    assert with_reuse.reused == 1 and not g.call_at(res.z).same_bits
    torch.testing.assert_close(reused, fresh, rtol=1e-4, atol=1e-4)
    assert g.call_at(z) is None  # the adjusted images moved


def test_batch_wise_reuses_only_a_measured_final_noise(kd, denoiser, batch):
    z, cond, uncond = batch
    sigmas = denoiser.get_sigmas(STEPS)
    for measure_after, expected in ((False, 0), (True, 1)):
        g = guidance_from_denoiser(denoiser, float(sigmas[0]), {"cond": cond}, {"cond": uncond})
        res = adjust_noise(z, g, MitigationConfig(method="batch_wise", uncond_steps=0), measure_after=measure_after)
        reused, with_reuse = _sample(kd, denoiser, cond, uncond, res.z, sigmas, reuse=g)
        fresh, _ = _sample(kd, denoiser, cond, uncond, res.z, sigmas)
        # without the measurement its latest evaluations are the probes at z + rho * g: never taken
        assert torch.equal(reused, fresh) and with_reuse.reused == expected, measure_after


def test_last_call_needs_every_image_evaluated_and_says_whether_it_is_one_calls_bits(denoiser, batch):
    z, cond, uncond = batch
    g = guidance_from_denoiser(denoiser, SIGMA0, {"cond": cond}, {"cond": uncond})
    assert g.last_call is None
    with torch.no_grad():
        g.select(torch.tensor([2])).pair(z[2:])
        assert g.last_call is None and g.select(torch.tensor([2])).call_at(z[2:]).same_bits  # images 0, 1: never
        g.pair(z + 1)
        assert g.last_call.same_bits and g.call_at(z) is None  # evaluated elsewhere
        g.select(torch.tensor([1])).pair(z[1:2])
        assert not g.last_call.same_bits and g.call_at(z) is None  # image 1 from a smaller call, the others at z + 1
        mixed = g.call_at(z + torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1, 1))  # each image where it was evaluated
        assert mixed is not None and not mixed.same_bits
        g.pair(z)
        g.select(torch.tensor([0, 2])).pair(z[[0, 2]])  # as many rows as a selection of two, not as the batch
        assert g.select(torch.tensor([0, 2])).call_at(z[[0, 2]]).same_bits and not g.call_at(z).same_bits
        assert not g.select(torch.tensor([2, 0])).call_at(z[[2, 0]]).same_bits  # the same rows at other places
        g.pair(z + 1)
        g.pair(z)
        call = g.call_at(z)
        full = denoiser(torch.cat([z, z]) * SIGMA0, torch.full((6,), SIGMA0), cond=torch.cat([cond, uncond]))
    assert call is not None and call.same_bits and torch.equal(call.denoised, full)
    assert torch.equal(call.x, torch.cat([z, z]) * SIGMA0)
    unbatched = guidance_from_denoiser(denoiser, SIGMA0, {"cond": cond}, {"cond": uncond}, batched=False)
    with torch.no_grad():
        unbatched.pair(z)
    assert unbatched.last_call is None  # cond and uncond in separate calls: no single call to match
