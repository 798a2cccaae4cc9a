"""The per-sample backward's memory (memsafe.checkpointing): frozen weights and activation checkpointing give the
same results with fewer kept bytes."""

import copy
import dataclasses
import gc
import weakref

import pytest
import torch

from helpers import SIGMA0, LatentDiffusionStandIn, small_unet  # tests/ is on sys.path (conftest.py)
from memsafe import InputError, MitigationConfig, adjust_noise, guidance_from_denoiser
from memsafe.checkpointing import (
    SavedBytes,
    checkpoint_blocks,
    checkpointed,
    free_memory,
    frozen_parameters,
    measured_plan,
)


def kept_bytes(fn):
    """Bytes autograd keeps for backward while ``fn`` runs its forward (every saved tensor, as packed)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t.detach()  # not t itself: that would leak the graph (SavedBytes.pack)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def gradient_and_kept_bytes(guidance, z):
    """d||guidance(z)|| / dz and the bytes autograd kept for it."""
    x = z.clone().requires_grad_(True)
    with torch.enable_grad():
        out, kept = kept_bytes(lambda: guidance(x).norm())
        (g,) = torch.autograd.grad(out, [x])
    return g, kept


def test_blocks_are_the_parts_of_the_unets_big_blocks(unet):
    blocks = checkpoint_blocks(unet)
    big = [*unet.down_blocks, *unet.up_blocks, unet.mid_block]  # registration order
    expected = [m for b in big for name in ("attentions", "resnets", "downsamplers", "upsamplers")
                for m in (getattr(b, name, None) or [])]
    assert {id(b) for b in blocks} == {id(b) for b in expected} and len(blocks) == len(expected)
    with pytest.raises(TypeError, match="model must be"):
        checkpoint_blocks(object())


def test_checkpointed_keeps_fewer_bytes_same_gradient_and_restores_forward(guidance, batch, unet):
    z, *_ = batch
    blocks = checkpoint_blocks(unet)

    plain_grad, plain_kept = gradient_and_kept_bytes(guidance, z)
    with checkpointed(blocks):
        assert all("forward" in b.__dict__ for b in blocks)
        ckpt_grad, ckpt_kept = gradient_and_kept_bytes(guidance, z)
        with torch.no_grad():  # forward-only calls are not checkpointed and give the same numbers
            torch.testing.assert_close(guidance(z), guidance(z))
    assert all("forward" not in b.__dict__ for b in blocks)  # restored: the class's forward again
    torch.testing.assert_close(ckpt_grad, plain_grad, rtol=1e-5, atol=1e-7)
    assert ckpt_kept < 0.5 * plain_kept, (ckpt_kept, plain_kept)


class RowsSeen(torch.nn.Module):
    """Logs the rows of every call of ``inner`` made with autograd recording."""

    def __init__(self, inner, log):
        super().__init__()
        self.inner, self.log = inner, log

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            self.log.append(args[0].shape[0])
        return self.inner(*args, **kwargs)


def test_the_backward_recomputes_a_part_one_row_at_a_time_when_weights_are_frozen(guidance, batch, unet,
                                                                                  monkeypatch):
    import memsafe.checkpointing as ckpt

    z, *_ = batch
    part = unet.down_blocks[0].attentions[0]
    log = []
    probe = RowsSeen(part.transformer_blocks[0], log)
    original = part.transformer_blocks[0]
    part.transformer_blocks[0] = probe
    try:
        plain_grad, _ = gradient_and_kept_bytes(guidance, z)
        log.clear()
        with checkpointed(checkpoint_blocks(unet)):
            trainable_grad, _ = gradient_and_kept_bytes(guidance, z)
            assert log == [6, 6]  # trainable weights: torch's checkpoint, forward and recompute of the whole call
            log.clear()
            with frozen_parameters(unet):
                small_grad, _ = gradient_and_kept_bytes(guidance, z)
                assert log == [6]  # frozen, but rows of a few KiB: recomputed together (each call costs time)
                log.clear()
                monkeypatch.setattr(ckpt, "RECOMPUTE_CHUNK_BYTES", 0)  # as if a row were large
                frozen_grad, _ = gradient_and_kept_bytes(guidance, z)
            assert log == [1] * 6  # frozen: row by row, the forward itself kept nothing inside the part
    finally:
        part.transformer_blocks[0] = original
    torch.testing.assert_close(trainable_grad, plain_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(frozen_grad, plain_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(small_grad, plain_grad, rtol=1e-5, atol=1e-7)


def test_checkpointed_restores_forward_on_error(unet):
    blocks = checkpoint_blocks(unet)
    own = blocks[0].forward  # a forward set on the instance by someone else must come back as it was
    blocks[0].forward = own
    with pytest.raises(RuntimeError, match="boom"), checkpointed(blocks):
        raise RuntimeError("boom")
    assert blocks[0].__dict__["forward"] is own and all("forward" not in b.__dict__ for b in blocks[1:])
    del blocks[0].forward


def test_frozen_parameters_keep_fewer_bytes_same_gradient_and_are_restored(guidance, batch, unet):
    z, *_ = batch
    params = list(unet.parameters())
    assert all(p.requires_grad for p in params)  # as a host leaves them (A1111 never switches it off)
    params[0].requires_grad_(False)  # one frozen by someone else stays frozen

    trainable_grad, trainable_kept = gradient_and_kept_bytes(guidance, z)
    with frozen_parameters(unet):
        assert not any(p.requires_grad for p in params)
        frozen_grad, frozen_kept = gradient_and_kept_bytes(guidance, z)
    assert not params[0].requires_grad and all(p.requires_grad for p in params[1:])
    torch.testing.assert_close(frozen_grad, trainable_grad, rtol=1e-5, atol=1e-7)
    assert frozen_kept < 0.9 * trainable_kept, (frozen_kept, trainable_kept)  # Linear inputs are not kept
    with pytest.raises(RuntimeError, match="boom"), frozen_parameters(unet):
        raise RuntimeError("boom")
    assert all(p.requires_grad for p in params[1:]) and all(p.grad is None for p in params)
    params[0].requires_grad_(True)
    with pytest.raises(TypeError, match="model must be"), frozen_parameters("unet"):
        pass


class GuidanceProbe:
    """A guidance that runs ``probe(z)`` before every evaluation by ``inner``, also of its ``select``ed subsets."""

    def __init__(self, inner, unet, log):
        self.inner, self.unet, self.log = inner, unet, log

    def probe(self, z):
        raise NotImplementedError

    def pair(self, z):
        self.probe(z)
        return self.inner.pair(z)

    def __call__(self, z):
        self.probe(z)
        return self.inner(z)

    def select(self, index):
        subset = copy.copy(self)
        subset.inner = self.inner.select(index)
        return subset


class WeightsSeen(GuidanceProbe):
    """Logs, at every autograd forward, whether any weight of ``unet`` required grad."""

    def probe(self, z):
        if torch.is_grad_enabled() and z.requires_grad:
            self.log.append(any(p.requires_grad for p in self.unet.parameters()))


def test_per_sample_freezes_the_models_weights_while_it_adjusts(guidance, batch, unet):
    z, *_ = batch
    norms = guidance(z).flatten(1).norm(dim=1).detach()
    cfg = MitigationConfig(method="per_sample", target=float(norms.min()) * 0.8, lr=0.05, max_iterations=3,
                           scale_with_size=False)
    log = []
    unfrozen = adjust_noise(z, WeightsSeen(guidance, unet, log), cfg, checkpointing="never")
    assert log and all(log)  # without the model, the weights stay as the host left them
    log.clear()
    frozen = adjust_noise(z, WeightsSeen(guidance, unet, log), cfg, model=unet, checkpointing="never")
    assert log and not any(log)
    assert all(p.requires_grad and p.grad is None for p in unet.parameters())  # restored, no weight gradients
    torch.testing.assert_close(frozen.z, unfrozen.z, rtol=1e-5, atol=1e-6)
    assert frozen.iterations.tolist() == unfrozen.iterations.tolist()


@pytest.mark.parametrize("optimizer", ["adamw", "polyak"])
def test_per_sample_with_checkpointing_gives_the_same_noise(guidance, batch, unet, optimizer):
    z, *_ = batch
    norms = guidance(z).flatten(1).norm(dim=1).detach()
    cfg = MitigationConfig(method="per_sample", target=float(norms.min()) * 0.8, lr=0.05, max_iterations=8,
                           optimizer=optimizer, scale_with_size=False)
    plain = adjust_noise(z, guidance, cfg)
    ckpt = adjust_noise(z, guidance, cfg, model=unet, checkpointing="always")
    # the recompute's gradients reach the part's input through another graph node: summed in another order,
    # round-off only (AdamW's per-element step magnifies it)
    torch.testing.assert_close(ckpt.z, plain.z, rtol=1e-3, atol=1e-4)
    assert ckpt.iterations.tolist() == plain.iterations.tolist() and plain.iterations.max() > 0
    assert all("forward" not in b.__dict__ for b in checkpoint_blocks(unet))


def test_checkpointing_argument_is_checked(guidance, batch, unet):
    z, *_ = batch
    cfg = MitigationConfig(method="per_sample", max_iterations=1)
    with pytest.raises(InputError, match="checkpointing must be one of on_oom, always, never"):
        adjust_noise(z, guidance, cfg, model=unet, checkpointing="sometimes")
    with pytest.raises(InputError, match="needs model"):
        adjust_noise(z, guidance, cfg, checkpointing="always")
    with pytest.raises(InputError, match="model must be a torch.nn.Module, got str"):
        adjust_noise(z, guidance, cfg, model="unet")
    with pytest.raises(InputError, match="checkpointing='budget' needs model"):
        adjust_noise(z, guidance, cfg, checkpointing="budget")
    for bad in (0, -5, True, 1.5, "1G"):
        with pytest.raises(InputError, match="memory_budget must be a positive number of bytes"):
            adjust_noise(z, guidance, cfg, model=unet, checkpointing="budget", memory_budget=bad)
    with pytest.raises(InputError, match="memory_budget applies to checkpointing='budget' or 'on_oom'"):
        adjust_noise(z, guidance, cfg, model=unet, checkpointing="always", memory_budget=2**20)


class OutOfMemoryAbove(GuidanceProbe):
    """Its autograd forward runs out of (pretend) CUDA memory for more than ``rows`` images unless the UNet is
    checkpointed; logs (images, checkpointed) of every autograd forward that ran."""

    def __init__(self, inner, unet, rows, log):
        super().__init__(inner, unet, log)
        self.rows = rows

    def probe(self, z):
        if torch.is_grad_enabled() and z.requires_grad:
            checkpointed_now = "forward" in checkpoint_blocks(self.unet)[0].__dict__
            if z.shape[0] > self.rows and not checkpointed_now:
                raise torch.cuda.OutOfMemoryError("pretend: CUDA out of memory")
            self.log.append((z.shape[0], checkpointed_now))


def test_out_of_memory_turns_checkpointing_on_before_halving_the_batch(guidance, batch, unet, caplog):
    z, *_ = batch
    norms = guidance(z).flatten(1).norm(dim=1).detach()
    cfg = MitigationConfig(method="per_sample", target=float(norms.min()) * 0.8, lr=0.05, max_iterations=4,
                           scale_with_size=False)
    expected = adjust_noise(z, guidance, cfg).z
    log = []
    res = adjust_noise(z, OutOfMemoryAbove(guidance, unet, 1, log), cfg, model=unet)  # on_oom
    torch.testing.assert_close(res.z, expected, rtol=1e-3, atol=1e-4)  # recomputed: round-off only
    assert log[0] == (3, True) and all(checkpointed for _, checkpointed in log)  # whole batch, checkpointed
    assert "recomputing the UNet's activations" in caplog.text  # the user learns why it got slower
    log.clear()
    res = adjust_noise(z, OutOfMemoryAbove(guidance, unet, 1, log), cfg, model=unet, checkpointing="never")
    torch.testing.assert_close(res.z, expected, rtol=1e-3, atol=1e-4)  # one image per call: batch round-off only
    assert log and all(rows == 1 and not checkpointed for rows, checkpointed in log)  # halved down to 1 image
    assert "1 image(s) per model call" in caplog.text
    with pytest.raises(torch.cuda.OutOfMemoryError):
        adjust_noise(z, OutOfMemoryAbove(guidance, unet, 0, []), cfg, model=unet, checkpointing="never")


# -- checkpointing under a memory budget -----------------------------------------------------------------------
def per_sample_config(guidance, z, iterations=4):
    norms = guidance(z).flatten(1).norm(dim=1).detach()
    return MitigationConfig(method="per_sample", target=float(norms.min()) * 0.5, lr=0.05, optimizer="polyak",
                            max_step=0.02, max_iterations=iterations, scale_with_size=False)


def plan_measured_on(guidance, z, unet):
    """A plan that measured every part in one forward + backward pass of the batch (as adjust_noise's first
    iteration does)."""
    return measured_plan(unet, lambda x: guidance(x).norm(), z, images=z.shape[0])


def forward_kept_bytes(guidance, z, unet, plan):
    """Bytes (distinct storages, weights excluded) that one autograd forward keeps with ``plan``'s choice."""
    saved = SavedBytes.excluding_weights(unet)
    x = z.clone().requires_grad_(True)
    with frozen_parameters(unet), checkpointed(plan.blocks, plan), torch.enable_grad(), saved.hooks():
        guidance(x).norm()  # as plan_measured_on's pass
    return saved.total


def test_budget_plan_keeps_what_fits_and_its_count_bounds_what_autograd_keeps(guidance, batch, unet):
    z, *_ = batch
    plan = plan_measured_on(guidance, z, unet)
    assert len(plan.costs) == len(plan.blocks) and all(c.flops > 0 for c in plan.costs.values())
    everything = plan.choose(2**40, 3)
    floor = plan.choose(1, 3)
    assert (everything.kept_parts, everything.recomputed_flops) == (everything.parts, 0.0)
    assert (floor.kept_parts, floor.recomputed_flops, floor.need) == (0, 1.0, floor.floor)
    half = plan.choose((floor.floor + everything.need) // 2, 3)
    assert 0 < half.kept_parts < half.parts and 0 < half.recomputed_flops < 1
    assert floor.floor <= half.need <= half.budget
    largest_recompute = max(c.peak for c in plan.costs.values())
    for budget, summary in ((1, floor), (half.budget, half), (2**40, everything)):
        plan.fix(budget, 3)
        kept = forward_kept_bytes(guidance, z, unet, plan)
        # the count is what the forward keeps (the floor exactly: the same tensors), never less
        assert kept <= summary.need - largest_recompute, (budget, kept, summary)
        if summary is floor:
            assert kept == floor.need - largest_recompute
    # fewer images per call: proportionally less of everything but the one recomputation
    assert plan.choose(2**40, 1).need < everything.need


def test_a_measured_plan_recomputes_each_part_in_chunks_within_the_largest_one_row_recomputation(guidance, batch,
                                                                                                 unet):
    z, *_ = batch
    part = unet.down_blocks[0].attentions[0]  # the 8x8 transformer: rows of a few KiB, the largest activations
    log = []
    original = part.transformer_blocks[0]
    part.transformer_blocks[0] = RowsSeen(original, log)
    try:
        plan = plan_measured_on(guidance, z, unet)
        assert log == [1] * 6  # the measuring recompute, one row at a time (the forward runs without autograd)
        position = {id(b): i for i, b in enumerate(plan.blocks)}[id(part)]
        largest = max(c.peak for c in plan.costs.values())
        assert plan.costs[position].peak == largest
        plan.fix(1, 3)  # every part recomputed
        steps = {i: plan.rows_per_chunk(i) for i in plan.costs}
        assert steps[position] == 1  # without the plan: all 6 rows at once (test above)
        assert all(steps[i] * plan.costs[i].peak <= largest for i in steps)
        assert max(steps.values()) > 1  # small parts still take several rows at once
        log.clear()
        with frozen_parameters(unet), checkpointed(plan.blocks, plan):
            g, _ = gradient_and_kept_bytes(guidance, z)
        assert log == [1] * 6
    finally:
        part.transformer_blocks[0] = original
    plain, _ = gradient_and_kept_bytes(guidance, z)
    torch.testing.assert_close(g, plain, rtol=1e-5, atol=1e-7)


def test_the_plans_log_line_gives_a_fractional_budget_as_set(guidance, batch, unet, caplog):
    z, *_ = batch
    plan = plan_measured_on(guidance, z, unet)
    plan.budget = int(12.5 * 2**20)  # Settings > MemSafe > VRAM budget 12.5 (MiB)
    with caplog.at_level("INFO", logger="memsafe"):
        assert plan.decide(torch.device("cpu")) is not None
    assert "within a budget of 12.5 MiB" in caplog.text


def test_budget_plan_recomputes_the_parts_with_the_least_flops_per_kept_byte(guidance, batch, unet):
    z, *_ = batch
    plan = plan_measured_on(guidance, z, unet)  # measured for 3 images: costs are the bytes/FLOPs of a 3-image call
    position = {id(b): i for i, b in enumerate(plan.blocks)}
    low, high = position[id(unet.mid_block.resnets[0])], position[id(unet.down_blocks[0].resnets[0])]
    # the same convolution FLOPs at 4x4x64 as at 8x8x32, half the bytes: the low resolution is the better keep
    assert plan.costs[low].flops / plan.costs[low].kept > 1.5 * plan.costs[high].flops / plan.costs[high].kept
    floor, full = plan.choose(1, 3).floor, plan.choose(2**40, 3).need
    seen_low_only = False
    for budget in range(floor, full + 2**12, 2**12):
        s = plan.choose(budget, 3)
        assert s.need <= budget
        for i in set(plan.costs) - set(s.kept):  # nothing recomputed would still have fitted
            assert s.need + int(plan.costs[i].kept) > budget, (budget, i)
        assert high not in s.kept or low in s.kept
        seen_low_only |= low in s.kept and high not in s.kept
    assert seen_low_only
    # a strided convolution keeps nothing but its input: kept by any budget that covers the floor
    downsamplers = [i for i, b in enumerate(plan.blocks) if type(b).__name__ == "Downsample2D"]
    assert downsamplers and all(plan.costs[i].kept == 0 for i in downsamplers)
    assert set(downsamplers) <= set(plan.choose(floor, 3).kept)


def test_per_sample_with_a_budget_gives_the_same_noise_and_reports_its_choice(guidance, batch, unet, caplog):
    z, *_ = batch
    cfg = per_sample_config(guidance, z)
    plain = adjust_noise(z, guidance, cfg, model=unet, checkpointing="never")
    assert plain.checkpoint_plan is None and plain.iterations.min() >= 2
    plan = plan_measured_on(guidance, z, unet)
    floor, full = plan.choose(1, 3), plan.choose(2**40, 3)
    for budget, kept_parts in ((1, 0), ((floor.floor + full.need) // 2, None), (2**40, full.parts)):
        caplog.clear()
        with caplog.at_level("INFO", logger="memsafe"):
            res = adjust_noise(z, guidance, cfg, model=unet, checkpointing="budget", memory_budget=budget)
        s = res.checkpoint_plan
        assert s is not None and s.budget == budget and s.images == 3
        assert s.kept_parts == kept_parts if kept_parts is not None else 0 < s.kept_parts < s.parts
        assert f"{s.kept_parts} of {s.parts} UNet parts keep their activations" in caplog.text
        assert ("below what recomputing every part needs" in caplog.text) == (budget == 1)
        torch.testing.assert_close(res.z, plain.z, rtol=1e-3, atol=1e-4)  # recomputed: round-off only
        assert res.iterations.tolist() == plain.iterations.tolist()
        assert all("forward" not in b.__dict__ for b in checkpoint_blocks(unet))


class OutOfMemoryAt(GuidanceProbe):
    """Its autograd forwards number ``at`` (1-based) run out of (pretend) CUDA memory."""

    def __init__(self, inner, unet, at, log):
        super().__init__(inner, unet, log)
        self.at, self.calls = set(at), 0

    def probe(self, z):
        if torch.is_grad_enabled() and z.requires_grad:
            self.calls += 1
            if self.calls in self.at:
                raise torch.cuda.OutOfMemoryError("pretend: CUDA out of memory")


def test_out_of_memory_plans_within_the_free_memory_then_recomputes_everything(guidance, batch, unet, caplog,
                                                                               monkeypatch):
    import memsafe.checkpointing as ckpt

    z, *_ = batch
    cfg = per_sample_config(guidance, z)
    expected = adjust_noise(z, guidance, cfg, model=unet, checkpointing="never")
    monkeypatch.setattr(ckpt, "free_memory", lambda device: 2**40)  # plenty free after the first error
    res = adjust_noise(z, OutOfMemoryAt(guidance, unet, {1}, []), cfg, model=unet)  # on_oom
    assert "as few as the free memory allows" in caplog.text
    s = res.checkpoint_plan
    assert s is not None and s.budget == int(ckpt.FREE_MEMORY_SHARE * 2**40) and s.kept_parts == s.parts
    torch.testing.assert_close(res.z, expected.z, rtol=1e-3, atol=1e-4)
    # the plan's choice did not fit after all (forward 3: the iteration after the measured one): every part
    caplog.clear()
    res = adjust_noise(z, OutOfMemoryAt(guidance, unet, {1, 3}, []), cfg, model=unet)
    assert "recomputing all of the UNet's activations" in caplog.text
    assert res.checkpoint_plan is not None and res.checkpoint_plan.kept_parts == 0
    torch.testing.assert_close(res.z, expected.z, rtol=1e-3, atol=1e-4)
    # an explicit budget is used after the error as well
    res = adjust_noise(z, OutOfMemoryAt(guidance, unet, {1}, []), cfg, model=unet, memory_budget=1)
    assert res.checkpoint_plan is not None and res.checkpoint_plan.kept_parts == 0
    assert res.checkpoint_plan.budget == 1


def test_free_memory_and_a_budget_taken_from_it(guidance, batch, unet, monkeypatch):
    import memsafe.checkpointing as ckpt

    z, *_ = batch
    cpu = free_memory(torch.device("cpu"))
    assert cpu is None or cpu > 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000 * 2**20, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 300 * 2**20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100 * 2**20)
    cuda = torch.device("cuda", 0)
    assert free_memory(cuda) == 1200 * 2**20  # free on the device + cached by torch but unused
    plan = plan_measured_on(guidance, z, unet)
    plan.measuring = True  # as after adjust_noise's first iteration
    s = plan.decide(cuda)
    assert s is not None and s.budget == int(ckpt.FREE_MEMORY_SHARE * 1200 * 2**20) and not plan.measuring
    assert plan.keep == frozenset(s.kept)


def test_flop_count_of_a_convolution_and_of_cpu_attention():
    from memsafe.checkpointing import _FlopCount

    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad(), _FlopCount() as count:
        conv(x)
    assert count.total == 2 * 2 * 16 * 5 * 5 * 8 * 3 * 3
    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    with torch.no_grad(), _FlopCount() as count:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert count.total == 2 * (2 * 2 * 4 * 10 * 6 * 8)  # q k^T and (scores) v, on the CPU kernel too


def live_tensors():
    """The tensors alive now that the garbage collector knows of (a leaked autograd graph's saved tensors too)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no __class__ lookups


def test_counting_saved_bytes_leaks_nothing():
    # A pack hook that returns the tensor it was given makes a cycle the garbage collector cannot see when the
    # tensor is an output its own op saves (exp, softmax, attention, group norm's statistics): grad_fn -> saved
    # tensor -> grad_fn. A backward pass breaks it (it frees what it unpacks); a graph dropped without one, as
    # when every image of a measured call has already stopped, would outlive its last reference.
    x = torch.randn(1000, requires_grad=True)
    saved = SavedBytes()
    with torch.enable_grad(), saved.hooks():
        y = torch.exp(x).softmax(0)
        z = torch.exp(x).softmax(0)
    assert saved.total == 4 * 1000 * 4  # exp's and softmax's outputs, each once per graph
    (g,) = torch.autograd.grad(y[0], [x])  # unpacks what it saved
    torch.testing.assert_close(g, torch.autograd.grad(torch.exp(x).softmax(0)[0], [x])[0])
    ref = weakref.ref(z)
    del z
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("stopped", [False, True], ids=["adjusting", "every-image-already-stopped"])
def test_a_budget_plan_leaves_no_tensors_alive_after_adjusting(guidance, batch, unet, stopped):
    # memsafe measures the plan in the first iteration of every adjust_noise call with checkpointing="budget" (and
    # after an out-of-memory error): whatever that leaks, a long-running WebUI leaks on every generation
    z, *_ = batch
    cfg = per_sample_config(guidance, z, iterations=2)
    if stopped:
        cfg = dataclasses.replace(cfg, target=float(guidance(z).flatten(1).norm(dim=1).max().detach()) * 2)
    runs = []
    for _ in range(3):
        res = adjust_noise(z, guidance, cfg, model=unet, checkpointing="budget", memory_budget=2**40)
        assert (res.iterations.max() == 0) == stopped
        del res
        runs.append(live_tensors())
    assert runs[2] == runs[1], runs


def test_half_precision_model_gives_the_same_noise_with_every_checkpointing_mode(kd, batch):
    """What the GPU runs (fp16 weights and noise; bench/gpu_perf.sh measures nothing else), here on the CPU: the
    per-sample method on a half-precision UNet, with checkpointing off, always and within a budget, gives the
    same noise in the noise's dtype (up to fp16 round-off), the same iterations, and puts every part back."""
    z, cond, uncond = batch
    unet = small_unet().half()
    denoiser = kd.external.CompVisDenoiser(LatentDiffusionStandIn(unet), quantize=False)
    guidance = guidance_from_denoiser(denoiser, SIGMA0, {"cond": cond.half()}, {"cond": uncond.half()},
                                      model_dtype=torch.float16)  # the hosts' models cast their input themselves
    z = z.half()
    cfg = per_sample_config(guidance, z)
    off = adjust_noise(z, guidance, cfg, model=unet, checkpointing="never")
    assert off.z.dtype == torch.float16 and torch.isfinite(off.z).all() and off.iterations.min() >= 2
    assert (off.norm_after < off.norm_before).all()
    for mode, budget in (("always", None), ("budget", 1), ("budget", 2**40)):
        res = adjust_noise(z, guidance, cfg, model=unet, checkpointing=mode, memory_budget=budget)
        assert res.z.dtype == torch.float16 and res.iterations.tolist() == off.iterations.tolist(), mode
        torch.testing.assert_close(res.z, off.z, rtol=1e-2, atol=1e-2)
        assert all("forward" not in b.__dict__ for b in checkpoint_blocks(unet))
    assert all(p.requires_grad for p in unet.parameters())  # the weights as the host left them
