"""The per-sample backward's memory (memsafe.checkpointing): frozen weights and activation checkpointing give the
same results with fewer kept bytes."""

import copy

import pytest
import torch

from memsafe import InputError, MitigationConfig, adjust_noise
from memsafe.checkpointing import checkpoint_blocks, checkpointed, frozen_parameters


def kept_bytes(fn):
    """Bytes autograd keeps for backward while ``fn`` runs its forward (every saved tensor, as packed)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

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
