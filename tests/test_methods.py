import math

import pytest
import torch

import memsafe
from helpers import SIGMA0  # tests/ is on sys.path (conftest.py)
from memsafe import (
    GuidanceError,
    InputError,
    Interrupted,
    MitigationConfig,
    adjust_noise,
    guidance_from_denoiser,
    risk_score,
)
from memsafe.config import OPTIMIZERS


def per_image_norm(t):
    return t.flatten(1).norm(dim=1)


def paper_alg1(z, eps_tilde, rho, gamma, iterations):
    """Alg. 1 written out as in the paper's code (adj_init_noise_batch_wise)."""
    x = z.clone()
    for _ in range(iterations):
        g = eps_tilde(x)
        delta = rho * g / per_image_norm(g).view(-1, 1, 1, 1)
        x = x - gamma * (eps_tilde(x + delta) - g)
    return x


def paper_alg2_one_image(z1, eps_tilde, lr, target, max_iterations, weight_decay):
    """Alg. 2 for ONE image as in the paper's code: torch.optim.AdamW, check loss <= target before each step."""
    x = z1.clone().requires_grad_(True)
    opt = torch.optim.AdamW([x], lr=lr, weight_decay=weight_decay)
    steps = 0
    for _ in range(max_iterations):
        with torch.enable_grad():
            loss = eps_tilde(x).norm()
        if loss.item() <= target:
            break
        (x.grad,) = torch.autograd.grad(loss, [x])  # not .backward(): leave the model's .grad alone
        opt.step()
        steps += 1
    return x.detach(), steps


def test_batch_wise_equals_the_papers_algorithm_1(guidance, batch):
    z, *_ = batch
    cfg = MitigationConfig(method="batch_wise", rho=3.0, gamma=0.7, iterations=2, scale_with_size=False)
    res = adjust_noise(z, guidance, cfg)
    with torch.no_grad():
        expected = paper_alg1(z, guidance, 3.0, 0.7, 2)
    assert not torch.equal(res.z, z)
    torch.testing.assert_close(res.z, expected, rtol=1e-5, atol=1e-5)
    assert res.applied == ["batch_wise"] * 3 and res.iterations.tolist() == [2, 2, 2]
    assert res.evaluations.forward == 3 * (2 * 2 + 1) and res.evaluations.backward == 0  # 2M + measure_after
    assert res.uncond_images.tolist() == [True] * 3
    with torch.no_grad():
        torch.testing.assert_close(res.norm_before, per_image_norm(guidance(z)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res.norm_after, per_image_norm(guidance(res.z)), rtol=1e-5, atol=1e-6)


def test_batch_wise_without_measure_after_spends_exactly_2m_evaluations(guidance, batch):
    z, *_ = batch
    cfg = MitigationConfig(method="batch_wise", rho=3.0, iterations=3, scale_with_size=False)
    res = adjust_noise(z, guidance, cfg, measure_after=False)
    assert res.evaluations.forward == 3 * 2 * 3
    assert torch.isnan(res.norm_after).all() and not res.still_at_risk().any()


def test_per_sample_equals_the_paper_exact_optimizer_one_image_at_a_time(guidance, batch, unet):
    z, *_ = batch
    with torch.no_grad():
        start = per_image_norm(guidance(z))
    target = float(start.min()) * 0.85
    cfg = MitigationConfig(
        method="per_sample", optimizer="adamw", lr=0.05, target=target, max_iterations=30, scale_with_size=False
    )
    assert all(p.requires_grad for p in unet.parameters())
    res = adjust_noise(z, guidance, cfg)
    assert all(p.grad is None for p in unet.parameters())  # gradients with respect to z only
    for i in range(3):
        one = guidance.select(torch.tensor([i]))
        expected, steps = paper_alg2_one_image(z[i : i + 1], one, 0.05, target, 30, 0.01)
        assert res.iterations[i] == steps
        torch.testing.assert_close(res.z[i : i + 1], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_per_sample_reaches_its_target_and_reports_true_norms(guidance, batch, optimizer):
    z, *_ = batch
    with torch.no_grad():
        start = per_image_norm(guidance(z))
    target = float(start.min()) * 0.75
    cfg = MitigationConfig(
        method="per_sample", optimizer=optimizer, lr=0.05, target=target, max_iterations=200, scale_with_size=False
    )
    res = adjust_noise(z, guidance, cfg)
    assert (res.norm_after <= target).all() and (res.iterations < 200).all() and (res.iterations > 0).all()
    with torch.no_grad():
        torch.testing.assert_close(res.norm_after, per_image_norm(guidance(res.z)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.norm_before, start, rtol=1e-5, atol=1e-6)
    assert not res.still_at_risk().any()
    # forward: one per step plus the final check; backward: one per step
    assert res.evaluations.forward == int(res.iterations.sum()) + 3
    assert res.evaluations.backward == int(res.iterations.sum())


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_per_sample_respects_max_iterations_and_flags_images_above_target(guidance, batch, optimizer):
    z, *_ = batch
    cfg = MitigationConfig(method="per_sample", optimizer=optimizer, lr=0.01, target=0.0, max_iterations=3,
                           scale_with_size=False)
    res = adjust_noise(z, guidance, cfg)
    assert res.iterations.tolist() == [3, 3, 3]
    assert res.still_at_risk().all()
    with torch.no_grad():
        torch.testing.assert_close(res.norm_after, per_image_norm(guidance(res.z)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_per_sample_batched_equals_each_image_alone(guidance, batch, optimizer):
    z, *_ = batch
    with torch.no_grad():
        start = per_image_norm(guidance(z))
    cfg = MitigationConfig(
        method="per_sample",
        optimizer=optimizer,
        max_step=0.01,  # small Polyak steps, so that the images need different numbers of them
        lr=0.05,
        target=float(start.median()) * 0.8,
        max_iterations=40,
        scale_with_size=False,
    )
    together = adjust_noise(z, guidance, cfg)
    assert len(set(together.iterations.tolist())) > 1  # images stop at different times
    for i in range(3):
        alone = adjust_noise(z[i : i + 1], guidance.select(torch.tensor([i])), cfg)
        assert alone.iterations.item() == together.iterations[i]
        torch.testing.assert_close(alone.z[0], together.z[i], rtol=1e-4, atol=1e-4)


def test_plain_callable_guidance_gives_the_same_results(guidance, batch):
    z, *_ = batch

    def plain(x):  # a user's own function: no pair(), no select()
        return guidance(x)

    with torch.no_grad():
        start = per_image_norm(guidance(z))
    for cfg in (
        MitigationConfig(
            method="per_sample",
            lr=0.05,
            target=float(start.median()) * 0.8,
            max_iterations=20,
            scale_with_size=False,
        ),
        MitigationConfig(
            method="auto",
            auto_method="batch_wise",
            rho=2.0,
            risk_threshold=float(start.median()),
            scale_with_size=False,
        ),
    ):
        a, b = adjust_noise(z, guidance, cfg), adjust_noise(z, plain, cfg)
        torch.testing.assert_close(a.z, b.z, rtol=1e-4, atol=1e-4)
        assert a.iterations.tolist() == b.iterations.tolist() and a.applied == b.applied


@pytest.mark.parametrize("auto_method", ["batch_wise", "per_sample"])
def test_auto_adjusts_only_images_at_risk_and_leaves_others_bit_identical(guidance, batch, auto_method):
    z, *_ = batch
    risk = risk_score(z, guidance)
    threshold = float(risk.sort().values[1])  # images with the two highest risks are adjusted
    cfg = MitigationConfig(
        method="auto",
        auto_method=auto_method,
        risk_threshold=threshold,
        rho=3.0,
        target=threshold * 0.8,
        lr=0.05,
        max_iterations=50,
        scale_with_size=False,
    )
    res = adjust_noise(z, guidance, cfg)
    low = int(risk.argmin())
    assert res.applied[low] == "none" and res.applied.count(auto_method) == 2
    assert torch.equal(res.z[low], z[low]) and res.iterations[low] == 0
    assert torch.equal(res.risk, risk)
    for i in range(3):
        if i != low:
            assert not torch.equal(res.z[i], z[i])
    assert res.uncond_images.tolist() == [a == "batch_wise" for a in res.applied]


def test_auto_below_threshold_costs_one_evaluation_and_changes_nothing(guidance, batch):
    z, *_ = batch
    cfg = MitigationConfig(method="auto", risk_threshold=1e5, scale_with_size=False)
    res = adjust_noise(z, guidance, cfg)
    assert torch.equal(res.z, z)
    assert res.applied == ["none"] * 3
    assert (res.evaluations.forward, res.evaluations.backward) == (3, 0)
    assert guidance.calls.calls == 1


def test_method_off_evaluates_nothing(guidance, batch):
    z, *_ = batch
    res = adjust_noise(z, guidance, MitigationConfig(method="off"))
    assert torch.equal(res.z, z) and res.z is not z
    assert guidance.calls.calls == 0 and res.applied == ["off"] * 3


def test_identical_cond_and_uncond_is_a_documented_no_op(denoiser, batch):
    z, cond, _ = batch  # e.g. an empty prompt with an empty negative prompt: eps_tilde == 0
    g = guidance_from_denoiser(denoiser, SIGMA0, {"cond": cond}, {"cond": cond})
    assert torch.equal(risk_score(z, g), torch.zeros(3))
    bw = adjust_noise(z, g, MitigationConfig(method="batch_wise", scale_with_size=False))
    assert torch.equal(bw.z, z)  # no direction: the probe is zero and so is the update
    ps = adjust_noise(z, g, MitigationConfig(method="per_sample", scale_with_size=False))
    assert torch.equal(ps.z, z) and ps.iterations.tolist() == [0, 0, 0]
    auto = adjust_noise(z, g, MitigationConfig(method="auto", scale_with_size=False))
    assert auto.applied == ["none"] * 3


def test_nan_or_inf_in_z_is_refused(guidance, batch):
    z, *_ = batch
    for bad in (math.nan, math.inf):
        z_bad = z.clone()
        z_bad[1, 0, 0, 0] = bad
        with pytest.raises(InputError, match=r"NaN or Inf in images \[1\]"):
            adjust_noise(z_bad, guidance, MitigationConfig())
        with pytest.raises(InputError):
            risk_score(z_bad, guidance)


@pytest.mark.parametrize("method", ["batch_wise", "per_sample", "auto"])
def test_nan_from_the_model_raises_naming_the_image(guidance, batch, method):
    z, *_ = batch

    def broken(x):
        out = guidance(x)
        return out.index_fill(0, torch.tensor([2]).to(x.device), math.nan) if x.shape[0] == 3 else out

    with pytest.raises(GuidanceError, match=r"images \[2\]"):
        adjust_noise(z, broken, MitigationConfig(method=method, risk_threshold=0.0, scale_with_size=False))


def test_wrong_shapes_dtypes_and_types_are_refused(guidance, batch):
    z, *_ = batch
    with pytest.raises(InputError, match=r"\[B, C, H, W\]"):
        adjust_noise(z[0], guidance, MitigationConfig())
    with pytest.raises(InputError, match="floating-point"):
        adjust_noise(z.long(), guidance, MitigationConfig())
    with pytest.raises(InputError, match="MitigationConfig"):
        adjust_noise(z, guidance, {"method": "auto"})
    with pytest.raises(InputError, match="guidance returned"):
        adjust_noise(z, lambda x: x[:, :1], MitigationConfig(method="batch_wise"))
    with pytest.raises(InputError, match="3 images"):
        adjust_noise(z[:2], guidance, MitigationConfig(method="batch_wise"))


def test_half_precision_noise_is_computed_in_float32_and_returned_in_its_dtype(guidance, batch):
    z, *_ = batch
    res = adjust_noise(
        z.half(), guidance, MitigationConfig(method="batch_wise", rho=3.0, scale_with_size=False)
    )
    assert res.z.dtype == torch.float16 and torch.isfinite(res.z).all()


def test_identical_inputs_give_bit_identical_outputs(guidance, batch):
    z, *_ = batch
    for cfg in (
        MitigationConfig(method="per_sample", lr=0.05, target=0.0, max_iterations=5, scale_with_size=False),
        MitigationConfig(method="batch_wise", rho=3.0, scale_with_size=False),
    ):
        a, b = adjust_noise(z, guidance, cfg), adjust_noise(z, guidance, cfg)
        assert torch.equal(a.z, b.z) and torch.equal(a.norm_after, b.norm_after)


def test_should_stop_is_honoured_within_one_iteration(guidance, batch):
    z, *_ = batch
    polls = []

    def should_stop():
        polls.append(guidance.calls.calls)
        return len(polls) > 2

    cfg = MitigationConfig(
        method="per_sample", lr=0.01, target=0.0, max_iterations=100, scale_with_size=False
    )
    with pytest.raises(Interrupted):
        adjust_noise(z, guidance, cfg, should_stop=should_stop)
    assert guidance.calls.calls == 2  # two iterations ran, the third never started


def test_progress_reports_every_iteration(guidance, batch):
    z, *_ = batch
    seen = []
    cfg = MitigationConfig(method="per_sample", lr=0.01, target=0.0, max_iterations=4, scale_with_size=False)
    adjust_noise(z, guidance, cfg, progress=seen.append)
    assert [p.iteration for p in seen] == [0, 1, 2, 3, 4]
    assert seen[0].active == 3 and seen[-1].active == 0
    assert all(p.norms.shape == (3,) and torch.isfinite(p.norms).all() for p in seen)
    seen.clear()
    adjust_noise(z, guidance, MitigationConfig(method="batch_wise", iterations=3), progress=seen.append)
    assert [(p.method, p.iteration, p.max_iterations) for p in seen] == [
        ("batch_wise", i, 3) for i in (1, 2, 3)
    ]


def test_size_scaling_is_applied_to_the_target(guidance, batch):
    z, *_ = batch  # 4x8x8 = 256 elements: scale sqrt(256/16384) = 1/8
    res = adjust_noise(z, guidance, MitigationConfig(method="auto", risk_threshold=8.0, max_iterations=2))
    assert res.scaled.scale == pytest.approx(0.125) and res.scaled.risk_threshold == pytest.approx(1.0)
    assert res.applied == ["per_sample" if r >= 1.0 else "none" for r in res.risk.tolist()]


def test_uncond_only_decision_by_noise_level():
    sigmas = torch.tensor([14.6, 9.0, 5.0, 2.0, 0.5, 0.0])
    assert [memsafe.uncond_only(float(s), sigmas, 2) for s in sigmas] == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert memsafe.uncond_only(7.0, sigmas, 2)  # a midpoint inside step 1 (DPM2, DPM++ 2S)
    assert not memsafe.uncond_only(14.6, sigmas, 0)
    assert memsafe.uncond_only(0.5, sigmas, 5)  # every step
    timesteps = [951, 901, 851, 801]  # DDIM-family: the timesteps in the order they are used
    assert [memsafe.uncond_only(t, timesteps, 2) for t in timesteps] == [True, True, False, False]
    batch_levels = torch.tensor([9.0, 9.0])
    assert memsafe.uncond_only(batch_levels, sigmas, 2).tolist() == [True, True]
    assert memsafe.uncond_only(torch.tensor([5.0 * (1 + 1e-7)]), sigmas, 2).tolist() == [False]  # round-off


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_per_sample_in_chunks_equals_one_batch(guidance, batch, optimizer):
    z, *_ = batch
    cfg = MitigationConfig(method="per_sample", optimizer=optimizer, lr=0.05, target=0.0, max_iterations=4,
                           scale_with_size=False)
    whole = adjust_noise(z, guidance, cfg)
    calls_whole = guidance.calls.calls
    chunked = adjust_noise(z, guidance, cfg, max_batch=1)
    assert guidance.calls.calls - calls_whole == 3 * calls_whole  # one image per model call
    torch.testing.assert_close(chunked.z, whole.z, rtol=1e-4, atol=1e-4)
    assert chunked.evaluations == whole.evaluations


class ConservativeGuidance:
    """eps_tilde = grad of a scalar potential (as for a score model): J is symmetric, so J u = J^T u."""

    def __init__(self, shape, seed=0):
        gen = torch.Generator().manual_seed(seed)
        n = shape[1] * shape[2] * shape[3]
        self.w = torch.randn(n, n, generator=gen) / n**0.5
        self.b = torch.randn(n, generator=gen) * 0.3

    def __call__(self, z):
        flat = z.flatten(1)
        # potential phi(z) = sum log cosh(W z + b)  ->  grad = W^T tanh(W z + b)
        return (torch.tanh(flat @ self.w.T + self.b) @ self.w).view_as(z)


def test_finite_difference_gradient_follows_autograd_on_a_conservative_field():
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    g = ConservativeGuidance(z.shape)
    start = per_image_norm(g(z))
    common = {"method": "per_sample", "lr": 0.02, "target": float(start.min()) * 0.8, "max_iterations": 60,
              "scale_with_size": False}
    exact = adjust_noise(z, g, MitigationConfig(**common))
    fd = adjust_noise(z, g, MitigationConfig(**common, gradient="finite_difference", fd_radius=1e-3))
    assert exact.iterations.tolist() == fd.iterations.tolist() and (fd.norm_after <= common["target"]).all()
    torch.testing.assert_close(fd.z, exact.z, rtol=1e-3, atol=1e-3)
    # two forward evaluations per step (at z and at the probe) plus the final check; no backward
    assert fd.evaluations.backward == 0
    assert fd.evaluations.forward == 2 * int(fd.iterations.sum()) + 3


def test_finite_difference_reaches_the_target_on_the_unet_without_backprop(guidance, batch, unet):
    z, *_ = batch
    with torch.no_grad():
        start = per_image_norm(guidance(z))
    target = float(start.min()) * 0.85
    cfg = MitigationConfig(method="per_sample", gradient="finite_difference", fd_radius=0.5, lr=0.05,
                           target=target, max_iterations=100, scale_with_size=False)
    with torch.inference_mode():  # forward only: works where autograd cannot (Forge runs under inference_mode)
        res = adjust_noise(z, guidance, cfg)
    assert (res.norm_after <= target).all() and res.evaluations.backward == 0
    assert all(p.grad is None for p in unet.parameters())


def test_polyak_steps_reach_the_target_in_fewer_iterations_than_adamw():
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    g = ConservativeGuidance(z.shape)
    start = per_image_norm(g(z))
    common = {"method": "per_sample", "target": float(start.min()) * 0.7, "max_iterations": 200,
              "scale_with_size": False}
    adamw = adjust_noise(z, g, MitigationConfig(**common, optimizer="adamw", lr=0.02))
    polyak = adjust_noise(z, g, MitigationConfig(**common, optimizer="polyak", max_step=0.5))
    assert (polyak.norm_after <= common["target"]).all() and (adamw.norm_after <= common["target"]).all()
    assert (polyak.iterations < adamw.iterations).all()
    # the step length is capped: with a tiny cap every image moves by exactly cap * sqrt(numel) per step
    one_step = {**common, "max_iterations": 1, "optimizer": "polyak"}
    capped = adjust_noise(z, g, MitigationConfig(**one_step, max_step=1e-3))
    assert torch.equal(adjust_noise(z, g, MitigationConfig(**one_step, max_step=1e-3, lr=0.5)).z, capped.z)  # not lr
    moved = (capped.z - z).flatten(1).norm(dim=1)
    torch.testing.assert_close(moved, torch.full((3,), 1e-3 * 32**0.5), rtol=1e-4, atol=1e-7)


def test_polyak_leaves_inactive_images_untouched():
    z = torch.randn(2, 1, 2, 2)
    grad = torch.randn(2, 1, 2, 2)
    steps = torch.zeros(2, dtype=torch.long)
    before = z.clone()
    memsafe.methods.polyak_step_(z, grad, torch.tensor([2.0, 2.0]), torch.tensor([True, False]), steps, aim=1.0,
                                 max_rms_step=10.0)
    assert torch.equal(z[1], before[1]) and not torch.equal(z[0], before[0])
    assert steps.tolist() == [1, 0]
    # a linear model is solved in one step: the projected norm drops to the aim
    torch.testing.assert_close((before[0] - z[0]).flatten().norm() * grad[0].norm(), torch.tensor(1.0))


def test_noise_rms_is_each_images_root_mean_square():
    z = torch.stack([torch.full((2, 4, 4), 1.2), torch.tensor([3.0, 4.0]).repeat(16).view(2, 4, 4)])
    torch.testing.assert_close(memsafe.noise_rms(z), torch.tensor([1.2, (12.5) ** 0.5]))
    draw = torch.randn(8, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    assert ((memsafe.noise_rms(draw) - 1).abs() < 5 / (2 * 4 * 64 * 64) ** 0.5).all()  # a draw's spread
    big = (100 * draw).half()  # squares of 1e4 summed over 16384 elements: inf in fp16, fine in float64
    torch.testing.assert_close(memsafe.noise_rms(big), 100 * memsafe.noise_rms(draw), rtol=1e-3, atol=0)


def test_the_rms_band_is_the_lab_measured_one_unless_a_draws_own_spread_is_wider():
    assert memsafe.noise_rms_limit(4 * 64 * 64) == memsafe.NOISE_RMS_LIMIT == 1.10  # SD sizes
    assert memsafe.noise_rms_limit(4 * 8 * 8) == pytest.approx(1 + 4 / 512**0.5)  # tiny latents: 4 spreads
    draws = memsafe.noise_rms(torch.randn(20000, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
    limit = memsafe.noise_rms_limit(4 * 8 * 8)
    assert int(((draws > limit) | (draws < 1 / limit)).sum()) <= 4  # a plain draw is (almost) never outside
    assert int(((draws > 1.10) | (draws < 1 / 1.10)).sum()) > 400  # as it would be with the fixed band


def test_out_of_distribution_flags_adjusted_noise_that_left_the_gaussian_rms():
    """Per-sample towards a minimum at RMS 1.4 (image 0) or 1.05 (image 1): only image 0 ends up outside the
    allowed RMS band, and an untouched image is never flagged whatever its seed drew (image 2, RMS 1.3)."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(3, 4, 8, 8, generator=gen)
    z = z / memsafe.noise_rms(z).view(-1, 1, 1, 1)  # RMS exactly 1
    z[2] *= 1.3
    minimum = torch.stack([1.4 * torch.randn(4, 8, 8, generator=gen), 1.05 * z[1], z[2]])
    minimum[0] /= memsafe.noise_rms(minimum[:1]) / 1.4

    def eps_tilde(x):
        return x - minimum  # ||eps_tilde|| is the distance to the minimum: 0 for image 2 (not at risk)

    cfg = MitigationConfig(method="auto", auto_method="per_sample", target=0.05, risk_threshold=0.5,
                           max_iterations=100, scale_with_size=False)
    res = adjust_noise(z, eps_tilde, cfg)
    assert res.applied == ["per_sample", "per_sample", "none"] and (res.norm_after[:2] <= 0.05).all()
    torch.testing.assert_close(res.noise_rms, memsafe.noise_rms(res.z))
    limit = memsafe.noise_rms_limit(4 * 8 * 8)
    assert res.noise_rms[0] > limit and res.noise_rms[2] > limit
    assert res.out_of_distribution().tolist() == [True, False, False]
    shrunk = adjust_noise(z[:1], lambda x: x - minimum[:1] / 1.4 * 0.75, MitigationConfig(
        method="per_sample", target=0.05, max_iterations=100, scale_with_size=False))
    assert shrunk.noise_rms[0] < 1 / limit and shrunk.out_of_distribution().tolist() == [True]
    off = adjust_noise(z, eps_tilde, MitigationConfig(method="off"))
    assert off.noise_rms.tolist() == pytest.approx(memsafe.noise_rms(z).tolist())
    assert not off.out_of_distribution().any()


def test_polyak_steps_within_hold_norm_steps_keep_each_images_norm_and_later_ones_are_free():
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(3, 2, 4, 4, generator=gen)
    grad = torch.randn(3, 2, 4, 4, generator=gen)
    norms, active = torch.tensor([5.0, 5.0, 5.0]), torch.tensor([True, True, False])
    free, held = z.clone(), z.clone()
    memsafe.methods.polyak_step_(free, grad, norms, active, torch.tensor([1, 2, 0]), aim=1.0, max_rms_step=0.3)
    steps = torch.tensor([1, 2, 0])
    memsafe.methods.polyak_step_(held, grad, norms, active, steps, aim=1.0, max_rms_step=0.3, hold_norm_steps=2)
    assert steps.tolist() == [2, 3, 0]
    # image 0 has taken 1 step (< 2): the free step, scaled back onto the sphere of its norm before the step
    torch.testing.assert_close(held[0].norm(), z[0].norm())
    torch.testing.assert_close(held[0], free[0] * (z[0].norm() / free[0].norm()))
    assert not torch.allclose(free[0].norm(), z[0].norm())  # the free step did change the norm
    # image 1 has taken 2 steps already: free; image 2 is inactive: untouched, bit for bit
    assert torch.equal(held[1], free[1]) and torch.equal(held[2], z[2])


def test_hold_norm_steps_holds_the_noise_norm_through_the_first_steps_of_adjust_noise_only():
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    g = ConservativeGuidance(z.shape)
    target = float(per_image_norm(g(z)).min()) * 0.05  # out of reach: every image takes every step
    common = {"method": "per_sample", "target": target, "scale_with_size": False, "optimizer": "polyak",
              "max_step": 0.3, "hold_norm_steps": 2}
    two = adjust_noise(z, g, MitigationConfig(**common, max_iterations=2))
    assert two.iterations.tolist() == [2, 2, 2]
    torch.testing.assert_close(two.z.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1))
    three = adjust_noise(z, g, MitigationConfig(**common, max_iterations=3))
    free = adjust_noise(z, g, MitigationConfig(**{**common, "hold_norm_steps": 0}, max_iterations=3))
    for result in (three, free):
        assert not torch.allclose(result.z.flatten(1).norm(dim=1), z.flatten(1).norm(dim=1), rtol=1e-3)
    assert not torch.allclose(three.z, free.z)  # the held steps led elsewhere
    # AdamW is not a Polyak step: the field does not change it (as lr does not change Polyak's)
    adamw = {**common, "optimizer": "adamw", "lr": 0.05, "max_iterations": 2}
    torch.testing.assert_close(adjust_noise(z, g, MitigationConfig(**adamw)).z,
                               adjust_noise(z, g, MitigationConfig(**{**adamw, "hold_norm_steps": 0})).z,
                               rtol=0, atol=0)


def test_a_held_polyak_step_keeps_a_half_precision_sdxl_size_latents_norm():
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(2, 4, 128, 128, generator=gen).half()  # 65536 elements: its squared norm exceeds fp16's max
    grad = torch.randn(2, 4, 128, 128, generator=gen).half()
    before = z.float().flatten(1).norm(dim=1)
    memsafe.methods.polyak_step_(z, grad, torch.tensor([50.0, 50.0]), torch.tensor([True, True]),
                                 torch.zeros(2, dtype=torch.long), aim=1.0, max_rms_step=0.1, hold_norm_steps=1)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(z.float().flatten(1).norm(dim=1), before, rtol=2e-3, atol=0)
