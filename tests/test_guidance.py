import math

import pytest
import torch

import memsafe
from memsafe import InputError, NotApplicableError, guidance_from_denoiser, guidance_from_eps_model
from memsafe.guidance import concat_rows, select_rows


def _eps_model(unet):
    return lambda x, t, cond: unet(x, t, encoder_hidden_states=cond).sample


def test_k_diffusion_builder_equals_eps_builder_at_the_matching_timestep(denoiser, unet, batch):
    z, cond, uncond = batch
    sigma0 = float(denoiser.sigmas[-1])  # = sigma(t=999), A1111's first sigma for most schedules
    assert float(denoiser.sigma_to_t(torch.tensor(sigma0))) == pytest.approx(999.0, abs=1e-3)
    # With the SGM noise multiplier, x = z * sqrt(1 + sigma^2): CompVisDenoiser's c_in makes the UNet input z.
    kd_guidance = guidance_from_denoiser(
        denoiser, sigma0, {"cond": cond}, {"cond": uncond}, sgm_noise_multiplier=True
    )
    eps_guidance = guidance_from_eps_model(_eps_model(unet), 999, {"cond": cond}, {"cond": uncond})
    with torch.no_grad():
        a, b = kd_guidance(z), eps_guidance(z)
    assert a.abs().max() > 1e-3  # a real, non-trivial guidance difference
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_k_diffusion_builder_scales_x_by_sigma(denoiser, batch):
    z, cond, uncond = batch
    seen = []

    def spy(x, sigma, cond):
        seen.append((x.clone(), sigma.clone()))
        return denoiser(x, sigma, cond=cond)

    sigma0 = 14.6146
    with torch.no_grad():
        guidance_from_denoiser(spy, sigma0, {"cond": cond}, {"cond": uncond})(z)
        guidance_from_denoiser(spy, sigma0, {"cond": cond}, {"cond": uncond}, sgm_noise_multiplier=True)(z)
    (x_plain, s_plain), (x_sgm, _) = seen
    torch.testing.assert_close(x_plain, torch.cat([z, z]) * sigma0)
    torch.testing.assert_close(x_sgm, torch.cat([z, z]) * math.sqrt(1 + sigma0**2))
    assert s_plain.shape == (6,) and torch.all(s_plain == torch.tensor(sigma0))


def test_v_prediction_conversion_matches_hand_computation(kd, batch):
    from helpers import LatentDiffusionStandIn, small_unet

    z, cond, uncond = batch
    v_unet = small_unet(seed=7)
    model = LatentDiffusionStandIn(v_unet, parameterization="v")
    v_denoiser = kd.external.CompVisVDenoiser(model)
    t, alpha_bar = 999, float(model.alphas_cumprod[999])
    sigma = math.sqrt((1 - alpha_bar) / alpha_bar)
    with torch.no_grad():
        # by hand: x_t = z (unit variance), eps = sqrt(a) * v + sqrt(1 - a) * x_t
        v_c = v_unet(z, torch.full((3,), t), encoder_hidden_states=cond).sample
        v_u = v_unet(z, torch.full((3,), t), encoder_hidden_states=uncond).sample
        by_hand = math.sqrt(alpha_bar) * (v_c - v_u)  # the sqrt(1-a) x_t terms cancel in the difference
        eps_c_by_hand = math.sqrt(alpha_bar) * v_c + math.sqrt(1 - alpha_bar) * z
        g_eps = guidance_from_eps_model(
            _eps_model(v_unet), t, {"cond": cond}, {"cond": uncond}, prediction="v", alpha_bar=alpha_bar
        )
        g_kd = guidance_from_denoiser(
            v_denoiser, sigma, {"cond": cond}, {"cond": uncond}, sgm_noise_multiplier=True
        )
        cond_part, _ = g_eps.pair(z)
        torch.testing.assert_close(cond_part, eps_c_by_hand, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_eps(z), by_hand, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g_kd(z), by_hand, rtol=1e-3, atol=1e-4)


def test_eps_model_guidance_records_the_model_call_a_timesteps_sampler_makes(batch):
    from helpers import small_unet

    z, cond, uncond = batch
    model = _eps_model(small_unet(seed=7))
    g = guidance_from_eps_model(model, 951, {"cond": cond}, {"cond": uncond}, prediction="v", alpha_bar=0.2)
    with torch.no_grad():
        g(z)
        call = g.call_at(z)
        t = 951.0 * torch.ones(6)  # as A1111's DDIM passes it: timesteps[index].item() * s_in
        assert call is not None and call.matches(torch.cat([z, z]), t, {"cond": torch.cat([cond, uncond])})
        # the model's own output (v), which is what the sampler's call returns, not the converted eps
        assert torch.equal(call.denoised, model(torch.cat([z, z]), t, torch.cat([cond, uncond])))
    assert g.call_at(z + 1e-3) is None


def test_separate_calls_equal_one_batched_call_and_are_counted(denoiser, batch):
    z, cond, uncond = batch
    batched = guidance_from_denoiser(denoiser, 14.6146, {"cond": cond}, {"cond": uncond})
    separate = guidance_from_denoiser(denoiser, 14.6146, {"cond": cond}, {"cond": uncond}, batched=False)
    with torch.no_grad():
        torch.testing.assert_close(batched(z), separate(z), rtol=1e-5, atol=1e-5)
    assert (batched.calls.calls, batched.calls.rows) == (1, 6)
    assert (separate.calls.calls, separate.calls.rows) == (2, 6)


def test_cond_and_uncond_of_different_token_lengths_run_separately(denoiser, batch):
    z, cond, _ = batch
    short_uncond = torch.randn(3, 3, 32, generator=torch.Generator().manual_seed(5))
    g = guidance_from_denoiser(denoiser, 14.6146, {"cond": cond}, {"cond": short_uncond})
    with torch.no_grad():
        out = g(z)
    assert out.shape == z.shape and g.calls.calls == 2


def test_and_prompts_weighted_sum_matches_a1111_combination(denoiser, batch):
    # image 0 has two cond rows (weights 0.7 and 0.3, "a AND b :0.3"), images 1 and 2 one each
    z, cond, uncond = batch
    extra = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(9))
    conds = torch.cat([cond[:1], extra, cond[1:]])
    owner = torch.tensor([0, 0, 1, 2])
    weight = torch.tensor([0.7, 0.3, 1.0, 1.0])
    g = guidance_from_denoiser(
        denoiser, 14.6146, {"cond": conds}, {"cond": uncond}, cond_image=owner, cond_weight=weight
    )
    sigma = torch.full((1,), 14.6146)

    def eps(x, c):
        xs = x * 14.6146
        return (xs - denoiser(xs, sigma.expand(x.shape[0]), cond=c)) / 14.6146

    with torch.no_grad():
        out = g(z)
        e_u = eps(z, uncond)
        expected0 = 0.7 * (eps(z[:1], conds[:1]) - e_u[:1]) + 0.3 * (eps(z[:1], conds[1:2]) - e_u[:1])
        expected12 = eps(z[1:], conds[2:]) - e_u[1:]
    torch.testing.assert_close(out[:1], expected0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1:], expected12, rtol=1e-4, atol=1e-5)
    # restricting to image 0 keeps both of its rows
    sub = g.select(torch.tensor([0]))
    with torch.no_grad():
        torch.testing.assert_close(sub(z[:1]), expected0, rtol=1e-4, atol=1e-5)


def test_select_restricts_to_images_in_the_given_order(denoiser, batch):
    z, cond, uncond = batch
    g = guidance_from_denoiser(denoiser, 14.6146, {"cond": cond}, {"cond": uncond})
    with torch.no_grad():
        full = g(z)
        sub = g.select(torch.tensor([2, 0]))(z[[2, 0]])
    torch.testing.assert_close(sub, full[[2, 0]], rtol=1e-5, atol=1e-5)


def test_nested_conditioning_rows_concat_and_select():
    sdxl_like = {"c": {"crossattn": torch.zeros(2, 3, 4), "vector": torch.ones(2, 5)}, "flag": "x"}
    other = {"c": {"crossattn": torch.ones(2, 3, 4), "vector": torch.zeros(2, 5)}, "flag": "x"}
    both = concat_rows(sdxl_like, other)
    assert both["c"]["crossattn"].shape == (4, 3, 4) and both["flag"] == "x"
    assert concat_rows({"c": torch.zeros(2, 3)}, {"c": torch.zeros(2, 4)}) is None
    picked = select_rows(both, torch.tensor([3]))
    assert picked["c"]["vector"].shape == (1, 5) and picked["c"]["vector"].sum() == 0


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0, float("nan")])
def test_guidance_scale_at_or_below_one_is_not_applicable(denoiser, batch, scale):
    _, cond, uncond = batch
    with pytest.raises(NotApplicableError, match="guidance_scale"):
        guidance_from_denoiser(denoiser, 14.6, {"cond": cond}, {"cond": uncond}, guidance_scale=scale)
    with pytest.raises(NotApplicableError):
        guidance_from_eps_model(
            lambda x, t, cond: x, 999, {"cond": cond}, {"cond": uncond}, guidance_scale=scale
        )
    guidance_from_denoiser(denoiser, 14.6, {"cond": cond}, {"cond": uncond}, guidance_scale=7.0)  # fine


def test_builder_input_errors_are_clear(denoiser, batch):
    z, cond, uncond = batch
    with pytest.raises(InputError, match="mapping of keyword"):
        guidance_from_denoiser(denoiser, 14.6, cond, uncond)
    with pytest.raises(InputError, match="cond_image"):
        guidance_from_denoiser(denoiser, 14.6, {"cond": cond[:2]}, {"cond": uncond})
    with pytest.raises(InputError, match="sigma"):
        guidance_from_denoiser(denoiser, -1.0, {"cond": cond}, {"cond": uncond})
    with pytest.raises(InputError, match="alpha_bar"):
        guidance_from_eps_model(lambda x, t, cond: x, 999, {"cond": cond}, {"cond": uncond}, prediction="v")
    with pytest.raises(InputError, match="prediction"):
        guidance_from_eps_model(lambda x, t, cond: x, 999, {"cond": cond}, {"cond": uncond}, prediction="x0")
    g = guidance_from_denoiser(denoiser, 14.6, {"cond": cond}, {"cond": uncond})
    with pytest.raises(InputError, match="3 images"):
        g(z[:2])
    bad_shape = guidance_from_eps_model(lambda x, t, cond: x[:, :2], 999, {"cond": cond}, {"cond": uncond})
    with pytest.raises(InputError, match="same shape"):
        bad_shape(z)
    assert isinstance(g, memsafe.Guidance)
