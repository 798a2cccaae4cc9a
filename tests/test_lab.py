"""The lab: the embedded model really memorizes, and every method runs end to end through memsafe's public API
on it and changes what it should. A few seeds only (CI budget: under 3 minutes on 2 CPU cores)."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
import torch

import memsafe
from memsafe.lab.data import DataSpec, Vocabulary, build_dataset, generic_captions
from memsafe.lab.model import MODEL_FILE, WEIGHTS_DIR, sd_alphas_cumprod, weights_metadata
from memsafe.lab.runner import (
    LAB_PRESET,
    Lab,
    Method,
    Run,
    generate,
    initial_noise,
    lab_config,
    paired_difference,
    pairs_for,
    summarize,
)
from memsafe.lab.sampler import ddim_sample, ddim_timesteps


@pytest.fixture(scope="module")
def lab() -> Lab:
    return Lab.load()


# -- data, weights, schedule: fast ----------------------------------------------------------------------------
def test_dataset_is_deterministic_and_duplicates_the_memorized_images():
    spec = DataSpec(generic_per_caption=3)
    a, b = build_dataset(spec), build_dataset(spec)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert len(a.captions) == len(a.images) == len(a.counts)
    for m in spec.memorized:
        i = a.copy_index[m.caption]
        assert a.captions[i] == m.caption and int(a.counts[i]) == m.duplicates
        assert a.captions.count(m.caption) == 1 + m.varied  # the copy and the varied images, nothing else
    assert set(generic_captions()) <= set(a.captions)
    assert len(a) == int(a.counts.sum()) == a.sample_index().numel()


def test_vocabulary_encodes_the_empty_caption_and_rejects_unknown_words():
    vocab = Vocabulary(("mem0",))
    ids = vocab.encode(["", "red circle mem0"])
    assert ids[0].tolist() == [1, 0, 0, 0]
    assert ids[1, 0] == 1 and (ids[1, 1:] > 1).all()
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        vocab.encode(["purple circle"])


def test_schedule_and_timesteps_match_stable_diffusion():
    ab = sd_alphas_cumprod()
    assert float(((1 - ab[999]) / ab[999]).sqrt()) == pytest.approx(14.6146, abs=1e-3)
    t = ddim_timesteps(50)
    assert t[0] == 999 and t[-1] == 19 and len(t) == 50


def test_committed_weights_are_small_safetensors_with_a_record():
    assert MODEL_FILE.stat().st_size <= 10 * 2**20
    for f in WEIGHTS_DIR.iterdir():
        assert f.suffix in (".safetensors", ".json", ".md"), f"unexpected file {f.name} (no pickles)"
    record = json.loads((WEIGHTS_DIR / "record.json").read_text())
    for key in ("command", "seed", "steps", "train_seconds", "machine"):
        assert key in record
    embedded = weights_metadata()  # the record travels inside the weights file too
    assert (embedded["seed"], embedded["steps"], embedded["command"]) == (
        record["seed"],
        record["steps"],
        record["command"],
    )


# -- the model memorizes ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_model_memorizes_and_generic_prompts_do_not_replicate(lab):
    pairs = (
        pairs_for(lab.regime("cfg_driven"), [0, 1])
        + pairs_for(lab.regime("point_mass"), [0])
        + pairs_for(lab.regime("generic")[::2], [0])
    )
    run = generate(lab, Method("no mitigation", "none"), pairs)
    memorized = [i for i, p in enumerate(run.prompts) if p.regime != "generic"]
    generic = [i for i, p in enumerate(run.prompts) if p.regime == "generic"]
    replicated = run.nn_sim >= lab.threshold
    assert replicated[memorized].float().mean() >= 0.5
    assert replicated[generic].float().mean() <= 0.05
    # the copies found are the memorized prompts' own training images
    for i in memorized:
        if replicated[i]:
            assert int(run.nn_index[i]) == run.prompts[i].copy
    assert summarize(lab, run, "generic")["alignment"] >= 0.75


@pytest.mark.slow
def test_cfg_driven_prompts_replicate_because_of_guidance(lab):
    """The regime the paper targets: without CFG (guidance 1) the CFG-driven prompts replicate clearly less."""
    pairs = pairs_for(lab.regime("cfg_driven"), [0, 1])
    full = generate(lab, Method("no mitigation", "none"), pairs)
    g1 = generate(lab, Method("guidance 1", "guidance_1", scale=1.0), pairs)
    rate_full = float((full.nn_sim >= lab.threshold).float().mean())
    rate_g1 = float((g1.nn_sim >= lab.threshold).float().mean())
    assert rate_g1 <= rate_full - 0.25


@pytest.mark.slow
def test_sampling_is_deterministic(lab):
    pairs = pairs_for(lab.regime("cfg_driven")[:2], [3])
    a = generate(lab, Method("no mitigation", "none"), pairs)
    b = generate(lab, Method("no mitigation", "none"), pairs)
    assert torch.equal(a.images, b.images)


# -- each method end to end through the public API --------------------------------------------------------------
def _guidance(lab, captions, seeds):
    z = initial_noise(seeds)
    cond = lab.model.encode(captions)
    uncond = lab.model.encode([""] * len(captions))
    t0 = float(ddim_timesteps(lab.steps)[0])
    g = memsafe.guidance_from_eps_model(
        lab.model, t0, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}, guidance_scale=7.0
    )
    return z, g, cond, uncond


@pytest.mark.slow
def test_per_sample_reaches_its_target(lab):
    captions = [p.caption for p in lab.regime("cfg_driven")[:4]]
    z, g, _, _ = _guidance(lab, captions, [0, 1, 2, 3])
    cfg = lab_config("per_sample")
    res = memsafe.adjust_noise(z, g, cfg)
    above = res.norm_before > cfg.target
    assert above.sum() >= 3, "memorized prompts start above the target"
    assert (res.norm_after <= cfg.target).all()
    assert (res.iterations[above] > 0).all() and (res.iterations[~above] == 0).all()
    assert res.evaluations.backward > 0
    assert torch.equal(res.z[~above], z[~above])
    torch.testing.assert_close(memsafe.risk_score(res.z, g), res.norm_after, rtol=1e-4, atol=1e-5)
    assert res.applied == ["per_sample"] * 4 and not res.uncond_images.any()


@pytest.mark.slow
def test_batch_wise_lowers_the_norm_and_flags_unconditional_first_steps(lab):
    captions = [p.caption for p in lab.regime("cfg_driven")[:4]]
    z, g, cond, uncond = _guidance(lab, captions, [0, 1, 2, 3])
    cfg = lab_config("batch_wise")
    res = memsafe.adjust_noise(z, g, cfg)
    assert res.norm_after.mean() < res.norm_before.mean()
    assert res.uncond_images.all() and (res.iterations == cfg.iterations).all()
    assert res.evaluations.forward == 4 * (2 * cfg.iterations + 1) and res.evaluations.backward == 0
    # the sampler honours the unconditional-only first steps: different images than plain CFG from step 0
    x_k = ddim_sample(
        lab.model, res.z, cond, uncond, steps=10, uncond_steps=2, uncond_images=res.uncond_images
    )
    x_0 = ddim_sample(lab.model, res.z, cond, uncond, steps=10)
    assert not torch.equal(x_k, x_0)


@pytest.mark.slow
def test_auto_flags_point_mass_prompts_and_leaves_generic_prompts_untouched(lab):
    point_mass = [p.caption for p in lab.regime("point_mass")]
    generic = [p.caption for p in lab.regime("generic")[::3]]
    captions = point_mass * 2 + generic
    seeds = list(range(len(captions)))
    z, g, _, _ = _guidance(lab, captions, seeds)
    res = memsafe.adjust_noise(z, g, lab_config("auto"))
    flagged = res.risk >= LAB_PRESET["risk_threshold"]
    n = 2 * len(point_mass)
    assert flagged[:n].float().mean() >= 0.75, "the point-mass prompts score above the threshold"
    assert not flagged[n:].any(), "generic prompts score below it"
    assert res.applied == [LAB_PRESET["auto_method"] if f else "none" for f in flagged.tolist()]
    assert torch.equal(res.z[~flagged], z[~flagged])  # bit-identical noise below the threshold
    assert (res.norm_after[flagged] < res.norm_before[flagged]).all()


@pytest.fixture(scope="module")
def cfg_driven_runs(lab) -> dict[str, Run]:
    """No mitigation and per-sample (the lab preset, the default step: Polyak's) on the CFG-driven prompts with
    seeds 0 and 1: generated once for the tests that read them."""
    pairs = pairs_for(lab.regime("cfg_driven"), [0, 1])
    return {"none": generate(lab, Method("no mitigation", "none"), pairs),
            "per_sample": generate(lab, Method("per-sample", "per_sample", lab_config("per_sample")), pairs)}


@pytest.mark.slow
def test_the_methods_reduce_replication_of_cfg_driven_prompts(lab, cfg_driven_runs):
    batch_wise = generate(lab, Method("batch-wise", "batch_wise", lab_config("batch_wise")),
                          pairs_for(lab.regime("cfg_driven"), [0, 1]))
    rates = {name: float((run.nn_sim >= lab.threshold).float().mean())
             for name, run in (*cfg_driven_runs.items(), ("batch_wise", batch_wise))}
    assert rates["none"] >= 0.5
    assert rates["per_sample"] <= rates["none"] - 0.25
    assert rates["batch_wise"] < rates["none"]


@pytest.mark.slow
def test_polyak_reaches_the_target_in_a_fraction_of_the_iterations_and_still_mitigates(lab, cfg_driven_runs):
    assert lab_config("per_sample") == lab_config("per_sample", optimizer="polyak")  # the fixture's run is Polyak's
    none, polyak = cfg_driven_runs["none"], cfg_driven_runs["per_sample"]
    pairs = list(zip(polyak.prompts, polyak.seeds, strict=True))
    adamw = generate(lab, Method("per-sample", "per_sample", lab_config("per_sample", optimizer="adamw")), pairs)
    target = LAB_PRESET["target"]
    assert (polyak.norm_after <= target).all() and (adamw.norm_after <= target).all()
    assert polyak.iterations.float().mean() <= adamw.iterations.float().mean() / 3
    rate = {name: float((run.nn_sim >= lab.threshold).float().mean()) for name, run in
            (("none", none), ("adamw", adamw), ("polyak", polyak))}
    assert rate["polyak"] <= rate["none"] - 0.25 and rate["polyak"] <= rate["adamw"] + 0.125


@pytest.mark.slow
def test_noise_out_of_distribution_is_warned_of_where_per_sample_breaks_the_image(lab, cfg_driven_runs):
    """Point-mass captions are escaped only by growing the noise, and their images come out off-prompt: the
    warning catches those; on the CFG-driven and generic prompts the adjusted noise stays a plausible draw."""
    point_mass = pairs_for(lab.regime("point_mass"), [0, 1, 2, 3])
    run = generate(lab, Method("per-sample", "per_sample", lab_config("per_sample")),
                   point_mass + pairs_for(lab.regime("generic")[::3], [0]))
    n = len(point_mass)
    outside, aligned = run.out_of_distribution, run.aligned
    assert (~aligned[:n]).sum() >= 4, "per-sample breaks some point-mass images"
    assert outside[:n][~aligned[:n]].float().mean() >= 0.75, "the broken ones are warned of"
    # others: the CFG-driven prompts (seeds 0, 1) and 8 generic ones (seed 0). 3 of these 24, all from seed 0,
    # whose draw has RMS 1.029 already (the lab's 768 elements spread 2.6%, an SD latent's 0.5%); 12 of 224 in the
    # evaluation (bench/results/lab.md, per-sample)
    others = torch.cat([cfg_driven_runs["per_sample"].out_of_distribution, outside[n:]])
    assert len(others) == 24 and others.float().mean() <= 1 / 6, "normal mitigation is rarely flagged"
    summary = summarize(lab, run, "point_mass")
    assert summary["out_of_distribution"] == pytest.approx(float(outside[:n].float().mean()))
    assert summary["misaligned_out_of_distribution"] == pytest.approx(
        float(outside[:n][~aligned[:n]].float().mean()))


def test_paired_difference_is_per_image_and_spread_over_seeds(lab):
    pairs = pairs_for(lab.regime("cfg_driven")[:2], [0, 1])  # 4 images: each seed has two
    run = generate(lab, Method("no mitigation", "none"), pairs)
    same = paired_difference(lab, run, run, "cfg_driven")
    assert same["images"] == 4 and same["alignment_difference"] == 0 and same["replication_difference_ci95"] == 0
    aligned = torch.ones(4, dtype=torch.bool)
    worse = aligned.clone()
    worse[0] = False  # one image of seed 0 loses its alignment: seed means -1/2 and 0
    diff = paired_difference(lab, dataclasses.replace(run, aligned=worse), dataclasses.replace(run, aligned=aligned),
                             "cfg_driven")
    assert diff["alignment_difference"] == pytest.approx(-0.25)
    assert diff["alignment_difference_ci95"] == pytest.approx(1.96 * statistics.stdev([-0.5, 0.0]) / 2**0.5)
    assert diff["replication_difference"] == 0
    with pytest.raises(ValueError, match="same"):
        paired_difference(lab, run, generate(lab, Method("no mitigation", "none"), pairs[:2]), "cfg_driven")


def test_rerun_variants_replaces_only_the_variant_rows(lab, tmp_path, monkeypatch):
    from memsafe.lab import evaluate

    results = {"command": "python -m memsafe.lab.evaluate", "seconds": 60.0, "main": [], "variants": [{"old": 1}]}
    (tmp_path / "lab.json").write_text(json.dumps(results))
    one = [Method("per_sample_polyak", "per_sample", lab_config("per_sample", optimizer="polyak"))]
    monkeypatch.setattr(evaluate, "variant_methods", lambda: one)
    monkeypatch.setattr(evaluate, "pairs_for", lambda prompts, seeds: pairs_for(prompts[:1], seeds))
    rows = evaluate.rerun_variants(lab, [0], tmp_path, "lab", "python -m memsafe.lab.evaluate --variants-only")
    saved = json.loads((tmp_path / "lab.json").read_text())
    assert saved["variants"] == json.loads(json.dumps(rows)) and [r["method"] for r in rows] == ["per_sample_polyak"]
    assert saved["main"] == [] and saved["command"] == results["command"]
    assert "--variants-only" in (tmp_path / "lab.md").read_text()
