"""The per-sample method's backward pass without memory it does not need: frozen weights, activation checkpointing.

Backprop through the UNet keeps every activation of the forward pass until the backward pass has used it: for SD1.5
at 512 px that is several times the memory of plain generation (the paper: 9.7 GB against 3.6 GB). With the
UNet's big blocks checkpointed, a forward under autograd keeps only each block's inputs, and the backward pass
recomputes one block at a time, one model row at a time when the weights are frozen (else with
``torch.utils.checkpoint``, non-reentrant, the whole call). The gradients are the same numbers up to float
round-off (a batch of one row may round differently); the cost is about one more forward per iteration.

Freezing is free: hosts leave the UNet's parameters requiring grad (A1111 never switches it off, because it runs
inference under ``torch.no_grad``). Under autograd every ``Linear`` then also keeps its input for a weight gradient
that a gradient with respect to the noise never computes; :func:`frozen_parameters` switches that off for the
duration (SD1.5 at 4x64x64, one image: 17% fewer bytes kept for the backward pass, `python -m bench saved`).

Host-free: works on any ``torch.nn.Module`` (A1111/Forge's ldm ``UNetModel``, diffusers' ``UNet2DConditionModel``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

BIG_BLOCK_SHARE = 0.05  # a top-level child with at least this share of the parameters is a block of its own
# The row-by-row recompute takes as many rows at once as fit in this many bytes of a part's first input: splitting
# saves memory where activations are large (SD1.5's 64x64 parts: 5 MiB a row in fp32, one row at a time), while
# for small ones each extra call only costs time (a kernel launch and its overhead per row).
RECOMPUTE_CHUNK_BYTES = 4 * 2**20


def checkpoint_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` to checkpoint: the parts of its big blocks. The big blocks are the elements of its
    top-level ``ModuleList``s (ldm's ``input_blocks``/``output_blocks``, diffusers' ``down_blocks``/``up_blocks``)
    and every other top-level child holding at least :data:`BIG_BLOCK_SHARE` of the parameters
    (``middle_block``/``mid_block``); their parts are their children, lists expanded: ldm's ResBlock and
    SpatialTransformer, diffusers' ``resnets[i]`` and ``attentions[i]``, the down/upsamplers. Parts rather than
    whole blocks, because the backward pass holds one checkpointed module's activations at a time (SD1.5, one
    image, CPU: peak 1.29x plain generation with parts, 1.43x with whole blocks, 1.80x without). Small top-level
    layers (time embedding, first and last convolutions) are left alone. Disjoint, in registration order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"memsafe: model must be a torch.nn.Module, got {type(model).__name__}")
    total = sum(p.numel() for p in model.parameters())
    blocks: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            blocks.extend(child)
        elif total and sum(p.numel() for p in child.parameters()) >= BIG_BLOCK_SHARE * total:
            blocks.append(child)
    return [part for block in blocks for part in _parts(block)]


def _parts(block: nn.Module) -> list[nn.Module]:
    parts: list[nn.Module] = []
    for child in block.children():
        parts.extend(child if isinstance(child, nn.ModuleList) else [child])
    return parts or [block]


def _checkpointing_forward(block: nn.Module, original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # sampling and other forward-only calls: untouched
            return original(*args, **kwargs)
        if not block.training and not any(p.requires_grad for p in block.parameters()):
            return _RecomputeByRows.run(original, args, kwargs)
        # weight gradients wanted, or a block in training mode (dropout): torch's checkpoint, which keeps the
        # RNG state and accumulates weight gradients
        return checkpoint(original, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    return forward


def _row_batched(tensors: Sequence[torch.Tensor], rows: int) -> bool:
    return all(t.dim() > 0 and t.shape[0] == rows for t in tensors)


class _RecomputeByRows(torch.autograd.Function):
    """A checkpointed part whose backward pass recomputes it a few model rows at a time (one row where a row of
    its input holds :data:`RECOMPUTE_CHUNK_BYTES` or more): the largest part's activations are held for one row,
    not the whole call (SD1.5 at 64x64, one image = a cond and an uncond row:
    241 MiB -> 120 MiB, `python -m bench saved`). A UNet part treats its rows independently, so the gradients are
    the same up to float round-off (a kernel may round a batch of 1 differently). Only for frozen weights (the
    per-sample method's case): gradients with respect to the inputs alone. Tensors in the arguments either have
    one row per model row (split) or are used whole; if an output is not row-batched, the part is recomputed
    whole."""

    @staticmethod
    def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        result: dict[str, Any] = {}
        outputs = _RecomputeByRows.apply(fn, leaves, spec, at, result, *[leaves[i] for i in at])
        out_leaves = list(result["leaves"])
        for i, t in zip(result["at"], outputs, strict=True):
            out_leaves[i] = t
        return tree_unflatten(out_leaves, result["spec"])

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Any], leaves: list[Any], spec: Any, at: list[int],
                result: dict[str, Any], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.fn, ctx.leaves, ctx.spec, ctx.at = fn, leaves, spec, at
        ctx.autocast = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]
        ctx.save_for_backward(*tensors)
        with torch.no_grad():
            out = _call(fn, leaves, spec, at, tensors)
        out_leaves, result["spec"] = tree_flatten(out)
        result["leaves"] = out_leaves
        result["at"] = [i for i, v in enumerate(out_leaves) if isinstance(v, torch.Tensor)]
        outputs = tuple(out_leaves[i] for i in result["at"])
        main = tensors[0] if tensors else None
        rows = main.shape[0] if main is not None and main.dim() > 0 else 0
        ctx.rows = rows if rows > 1 and _row_batched(outputs, rows) else 0  # 0: recompute whole
        ctx.row_bytes = main.numel() * main.element_size() // rows if ctx.rows and main is not None else 0
        return outputs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[Any, ...]:
        tensors = ctx.saved_tensors
        need = ctx.needs_input_grad[5:]
        grads: list[torch.Tensor | None] = [torch.zeros_like(t) if n else None for t, n in zip(tensors, need)]
        wanted = [i for i, n in enumerate(need) if n]
        if not wanted:
            return (None,) * (5 + len(tensors))
        split = [bool(ctx.rows) and t.dim() > 0 and t.shape[0] == ctx.rows for t in tensors]
        step = max(1, RECOMPUTE_CHUNK_BYTES // max(1, ctx.row_bytes)) if ctx.rows else 0
        chunks = [slice(r, r + step) for r in range(0, ctx.rows, step)] if step else [slice(None)]
        for rows in chunks:
            inputs = [(t[rows] if s else t).detach().requires_grad_(n) for t, s, n in zip(tensors, split, need)]
            with torch.enable_grad(), _autocast(ctx.autocast):
                out = _call(ctx.fn, ctx.leaves, ctx.spec, ctx.at, inputs)
            outputs = [v for v in tree_flatten(out)[0] if isinstance(v, torch.Tensor)]
            pairs = [(o, g[rows]) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
            if not pairs:
                continue
            found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                        [g for _, g in pairs], allow_unused=True)
            for i, g in zip(wanted, found):
                target = grads[i]
                if g is not None and target is not None:
                    (target[rows] if split[i] else target).add_(g)
        return (None, None, None, None, None, *grads)


def _call(fn: Callable[..., Any], leaves: list[Any], spec: Any, at: list[int],
          tensors: Sequence[torch.Tensor]) -> Any:
    filled = list(leaves)
    for i, t in zip(at, tensors, strict=True):
        filled[i] = t
    args, kwargs = tree_unflatten(filled, spec)
    return fn(*args, **kwargs)


@contextmanager
def _autocast(states: list[tuple[str, bool, torch.dtype]]) -> Iterator[None]:
    """The forward's autocast state again (the backward pass may run in another thread, without it)."""
    with ExitStack() as stack:
        for device, enabled, dtype in states:
            if enabled or torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
        yield


@contextmanager
def checkpointed(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Within the ``with`` block, every module of ``blocks`` recomputes its activations during backward instead of
    keeping them, whenever autograd records its forward. Each module's ``forward`` is replaced on the instance and
    restored on exit, also on error. The recomputation calls the original ``forward`` directly: forward hooks of
    the block itself do not run again (hosts that move weights between devices in hooks, such as A1111's
    ``--lowvram``, must not use this)."""
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for block in blocks:
            saved.append((block, block.__dict__.get("forward")))
            block.forward = _checkpointing_forward(block, block.forward)
        yield
    finally:
        for block, own in reversed(saved):
            if own is None:
                del block.forward
            else:
                block.forward = own


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Within the ``with`` block, no parameter of ``model`` requires grad; those that did require it again on exit,
    also on error. Gradients with respect to inputs are unchanged (the same backward formulas run), and autograd
    no longer saves activations that only weight gradients need."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"memsafe: model must be a torch.nn.Module, got {type(model).__name__}")
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


__all__ = ["checkpoint_blocks", "checkpointed", "frozen_parameters"]
