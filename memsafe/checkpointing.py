"""The per-sample method's backward pass without memory it does not need: frozen weights, activation checkpointing.

Backprop through the UNet keeps every activation of the forward pass until the backward pass has used it: for SD1.5
at 512 px that is several times the memory of plain generation (the paper: 9.7 GB against 3.6 GB). With the
UNet's big blocks checkpointed, a forward under autograd keeps only each block's inputs, and the backward pass
recomputes one block at a time, one model row at a time when the weights are frozen (else with
``torch.utils.checkpoint``, non-reentrant, the whole call). The gradients are the same numbers up to float
round-off (a batch of one row may round differently); the cost is about one more forward per iteration.

Between all and nothing, a :class:`CheckpointPlan` checkpoints only what does not fit in a memory budget (given,
or taken from the device's free memory): measured in the first iteration, the parts that keep the fewest bytes for
their FLOPs keep their activations, the rest is recomputed (SD1.5 at 4x64x64 fp32, one image: every part
recomputed keeps 414 MiB; 1000 MiB lets 28 of 44 parts keep theirs and recomputes 49% of the FLOPs;
`python -m bench saved --budgets ...`).

Freezing is free: hosts leave the UNet's parameters requiring grad (A1111 never switches it off, because it runs
inference under ``torch.no_grad``). Under autograd every ``Linear`` then also keeps its input for a weight gradient
that a gradient with respect to the noise never computes; :func:`frozen_parameters` switches that off for the
duration (SD1.5 at 4x64x64, one image: 17% fewer bytes kept for the backward pass, `python -m bench saved`).

Host-free: works on any ``torch.nn.Module`` (A1111/Forge's ldm ``UNetModel``, diffusers' ``UNet2DConditionModel``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

_log = logging.getLogger(__name__)

BIG_BLOCK_SHARE = 0.05  # a top-level child with at least this share of the parameters is a block of its own
# Without a measured plan, the row-by-row recompute takes as many rows at once as fit in this many bytes of a part's
# first input: splitting saves memory where activations are large (SD1.5's 64x64 parts: 5 MiB a row in fp32, one
# row at a time), while for small ones each extra call only costs time (a kernel launch and its overhead per row).
# A measured CheckpointPlan sizes the chunks by what each part's recomputation holds instead (rows_per_chunk).
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


def _checkpointing_forward(block: nn.Module, original: Callable[..., Any], plan: CheckpointPlan | None,
                           position: int) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # sampling and other forward-only calls: untouched
            return original(*args, **kwargs)
        if plan is not None and position in plan.keep:  # the plan lets this part keep its activations
            return original(*args, **kwargs)
        if not block.training and not any(p.requires_grad for p in block.parameters()):
            if plan is None:
                return _RecomputeByRows.run(original, args, kwargs)
            return _RecomputeByRows.run(original, args, kwargs, plan.recorder(position), plan.rows_per_chunk(position))
        # weight gradients wanted, or a block in training mode (dropout): torch's checkpoint, which keeps the
        # RNG state and accumulates weight gradients
        return checkpoint(original, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    return forward


def _row_batched(tensors: Sequence[torch.Tensor], rows: int) -> bool:
    return all(t.dim() > 0 and t.shape[0] == rows for t in tensors)


# _RecomputeByRows.forward's arguments before the tensors: fn, leaves, spec, at, result, measure, rows_per_chunk
_NON_TENSOR_ARGS = 7
# measures one part's recomputation for a CheckpointPlan: (run the part's forward, its inputs) -> its outputs
Measure = Callable[[Callable[[], Any], Sequence[torch.Tensor]], Any]


class _RecomputeByRows(torch.autograd.Function):
    """A checkpointed part whose backward pass recomputes it a few model rows at a time (``rows_per_chunk``; 0: one
    row where a row of its input holds :data:`RECOMPUTE_CHUNK_BYTES` or more, else as many as fit in that): the
    largest part's activations are held for one row,
    not the whole call (SD1.5 at 64x64, one image = a cond and an uncond row:
    241 MiB -> 120 MiB, `python -m bench saved`). A UNet part treats its rows independently, so the gradients are
    the same up to float round-off (a kernel may round a batch of 1 differently). Only for frozen weights (the
    per-sample method's case): gradients with respect to the inputs alone. Tensors in the arguments either have
    one row per model row (split) or are used whole; if an output is not row-batched, the part is recomputed
    whole."""

    @staticmethod
    def run(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
            measure: Measure | None = None, rows_per_chunk: int = 0) -> Any:
        leaves, spec = tree_flatten((args, kwargs))
        at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        result: dict[str, Any] = {}
        outputs = _RecomputeByRows.apply(fn, leaves, spec, at, result, measure, rows_per_chunk,
                                         *[leaves[i] for i in at])
        out_leaves = list(result["leaves"])
        for i, t in zip(result["at"], outputs, strict=True):
            out_leaves[i] = t
        return tree_unflatten(out_leaves, result["spec"])

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Any], leaves: list[Any], spec: Any, at: list[int],
                result: dict[str, Any], measure: Measure | None, rows_per_chunk: int,
                *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.fn, ctx.leaves, ctx.spec, ctx.at, ctx.measure = fn, leaves, spec, at, measure
        ctx.rows_per_chunk = rows_per_chunk
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
        need = ctx.needs_input_grad[_NON_TENSOR_ARGS:]
        grads: list[torch.Tensor | None] = [torch.zeros_like(t) if n else None for t, n in zip(tensors, need)]
        wanted = [i for i, n in enumerate(need) if n]
        if not wanted:
            return (None,) * (_NON_TENSOR_ARGS + len(tensors))
        split = [bool(ctx.rows) and t.dim() > 0 and t.shape[0] == ctx.rows for t in tensors]
        step = (ctx.rows_per_chunk or max(1, RECOMPUTE_CHUNK_BYTES // max(1, ctx.row_bytes))) if ctx.rows else 0
        chunks = [slice(r, r + step) for r in range(0, ctx.rows, step)] if step else [slice(None)]
        for rows in chunks:
            inputs = [(t[rows] if s else t).detach().requires_grad_(n) for t, s, n in zip(tensors, split, need)]
            with torch.enable_grad(), _autocast(ctx.autocast):
                run = partial(_call, ctx.fn, ctx.leaves, ctx.spec, ctx.at, inputs)
                out = ctx.measure(run, inputs) if ctx.measure is not None else run()
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
        return (*(None,) * _NON_TENSOR_ARGS, *grads)


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
def checkpointed(blocks: Sequence[nn.Module], plan: CheckpointPlan | None = None) -> Iterator[None]:
    """Within the ``with`` block, every module of ``blocks`` recomputes its activations during backward instead of
    keeping them, whenever autograd records its forward; with a ``plan`` (made for these ``blocks``), only those
    it does not let keep them, and the plan measures the parts while it is measuring. Each module's ``forward`` is
    replaced on the instance and restored on exit, also on error. The recomputation calls the original
    ``forward`` directly: forward hooks of the block itself do not run again (hosts that move weights between
    devices in hooks, such as A1111's ``--lowvram``, must not use this)."""
    if plan is not None and len(plan.blocks) != len(blocks):
        raise ValueError("memsafe: the checkpoint plan was made for other blocks")
    saved: list[tuple[nn.Module, Any]] = []
    try:
        for position, block in enumerate(blocks):
            saved.append((block, block.__dict__.get("forward")))
            block.forward = _checkpointing_forward(block, block.forward, plan, position)
        yield
    finally:
        for block, own in reversed(saved):
            if own is None:
                del block.forward
            else:
                block.forward = own


# -- checkpointing under a memory budget ------------------------------------------------------------------------
# The share of a device's free memory that a budget taken from it gives the backward pass's kept activations: the
# rest is for what the count does not see (kernel workspaces, the gradients flowing back, the allocator's
# fragmentation) and for the host.
FREE_MEMORY_SHARE = 0.75


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: on CUDA the device's free memory plus what torch's caching
    allocator holds unused; on the CPU the kernel's ``MemAvailable`` (Linux); None where it is not known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def _flop_formulas() -> dict[Any, Callable[..., int]]:
    """torch's FLOP formulas by op (matmuls, convolutions, attention), plus the CPU flash attention, which torch's
    table leaves out. Empty if this torch has none (the plan then ranks parts by their bytes alone)."""
    try:
        from torch.utils.flop_counter import flop_registry, sdpa_flop_count, shape_wrapper
    except ImportError:
        return {}
    formulas = dict(flop_registry)
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:
        def cpu_sdpa(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return sdpa_flop_count(query, key, value)

        formulas[cpu_flash] = shape_wrapper(cpu_sdpa)
    return formulas


class _FlopCount(TorchDispatchMode):
    """Counts the floating-point operations of the ops that run inside it (no module hooks, nothing kept)."""

    formulas: dict[Any, Callable[..., int]] | None = None

    def __init__(self) -> None:
        super().__init__()
        if _FlopCount.formulas is None:
            _FlopCount.formulas = _flop_formulas()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = (self.formulas or {}).get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def storage_key(t: torch.Tensor) -> tuple[int, str]:
    """A tensor's storage: its address and device (views of one storage share it)."""
    return t.untyped_storage().data_ptr(), str(t.device)


class SavedBytes:
    """Bytes of the distinct storages that autograd packs for backward inside :meth:`hooks`, each storage counted
    once, those in ``skip`` (by :func:`storage_key`) not at all."""

    def __init__(self, skip: set[tuple[int, str]] | None = None) -> None:
        self.skip = skip or set()
        self.storages: dict[tuple[int, str], int] = {}

    @classmethod
    def excluding_weights(cls, model: nn.Module) -> SavedBytes:
        return cls({storage_key(p) for p in model.parameters()})

    def add(self, t: torch.Tensor) -> None:
        key = storage_key(t)
        if key not in self.skip:
            self.storages[key] = t.untyped_storage().nbytes()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """Counts ``t`` and keeps it for autograd as a detached alias (the same storage, so the same bytes): the
        tensor itself would tie an op's saved output to the op's own grad_fn in a cycle that the garbage
        collector cannot see, and a graph dropped without a backward pass would never be freed."""
        self.add(t)
        return t.detach()

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


@dataclass
class PartCost:
    """One part, as measured when the backward pass recomputed it, summed over the measured images: ``kept``, the
    bytes its activations keep for backward when it is not checkpointed (its inputs and the weights are kept
    either way and not counted), and ``flops``, what its forward (so its recomputation) costs; ``peak``: the most
    bytes one recomputation held at its turn (measured one model row at a time; the whole call for a part whose
    outputs are not row-batched)."""

    kept: float = 0.0
    flops: float = 0.0
    peak: int = 0

    def add(self, kept: float, flops: float, peak: int) -> None:
        self.kept += kept
        self.flops += flops
        self.peak = max(self.peak, peak)


@dataclass(frozen=True)
class PlanSummary:
    """What a :class:`CheckpointPlan` chose. Bytes are counts of what autograd keeps for one model call of
    ``images`` images (transient buffers not included)."""

    budget: int | None  # bytes the choice had to fit in; None: no limit known (every part keeps its activations)
    images: int  # images per model call the choice was made for
    parts: int
    need: int  # bytes the choice keeps: the floor plus the kept parts' activations
    floor: int  # bytes kept with every part checkpointed (parts' inputs, layers between, one row's recomputation)
    recomputed_flops: float  # share of the parts' forward FLOPs that each backward pass recomputes, 0..1
    kept: tuple[int, ...] = ()  # positions (in the plan's blocks) of the parts that keep their activations

    @property
    def kept_parts(self) -> int:
        """How many parts keep their activations (are not recomputed)."""
        return len(self.kept)


class CheckpointPlan:
    """Which parts of a UNet are checkpointed, chosen under a memory budget (``adjust_noise(...,
    checkpointing="budget")``): as few as the budget allows, so the backward pass recomputes as little as it can.

    While ``measuring``, every part is checkpointed and each part's recomputation in the backward pass (one row
    at a time) records, per image, the bytes the part keeps when it is not checkpointed and its FLOPs (exact
    counts: the saved tensors' storages, torch's FLOP formulas); what stays kept with every part checkpointed (their inputs, the layers
    between them) is counted in the forward (:meth:`chunk`). :meth:`decide` then lets the parts with the most
    FLOPs per kept byte keep their activations while the count stays within the budget: SD1.5's low-resolution
    parts first (a level down, the same convolution FLOPs keep half the bytes), its 64x64 attention last. The
    choice depends on the model, the shapes and the budget only: an explicit budget gives reproducible results.
    One plan per ``adjust_noise`` call, made for ``blocks`` (:func:`checkpoint_blocks` of ``model``)."""

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], budget: int | None = None) -> None:
        self.blocks = list(blocks)
        self.budget = budget
        self.weights = {storage_key(p) for p in model.parameters()}
        self.keep: frozenset[int] = frozenset()
        self.measuring = True
        self.summary: PlanSummary | None = None
        self.costs: dict[int, PartCost] = {}
        self._base = 0.0  # bytes kept with every part checkpointed, summed over the measured images
        self._images = 0  # images measured
        self._call_images = 0  # the most images in one measured model call
        self._pending: dict[int, PartCost] | None = None  # the measurements of the model call being measured

    def begin_iteration(self) -> None:
        """Start measuring afresh (an iteration retried after an out-of-memory error measures again)."""
        if self.measuring:
            self.costs, self._base, self._images, self._call_images = {}, 0.0, 0, 0

    def rows_per_chunk(self, position: int) -> int:
        """How many model rows at once the backward pass recomputes the part at ``position`` with: one while
        measuring (so each part's measured peak is one row's); then as many as keep its recomputation within the
        largest one-row recomputation of any part, which the floor counts anyway (SDXL's ten-block transformers at
        16x16 hold 270 MiB for a row of 1.25 MiB input at 4x64x64 fp32: one row at a time, where the input-size
        rule took both rows and the floor was 787 MiB instead of 517). 0 (the input-size rule) for a part never
        measured; a part that keeps nothing may take every row at once."""
        if self.measuring:
            return 1
        cost = self.costs.get(position)
        if cost is None:
            return 0
        largest = max(c.peak for c in self.costs.values())
        return max(1, largest // max(1, cost.peak))

    def recorder(self, position: int) -> Measure | None:
        """What measures the part at ``position`` when the backward pass recomputes it (None: not measuring)."""
        return partial(self._measure, position) if self.measuring and self._pending is not None else None

    def _measure(self, position: int, run: Callable[[], Any], inputs: Sequence[torch.Tensor]) -> Any:
        saved = SavedBytes(self.weights | {storage_key(t) for t in inputs})
        flops = _FlopCount()
        try:
            with saved.hooks(), flops:
                out = run()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as error:  # an op that the FLOP count cannot follow: run it uncounted
            _log.debug("memsafe: FLOPs of a checkpointed part not counted (%s)", error)
            saved, flops = SavedBytes(saved.skip), _FlopCount()
            with saved.hooks():
                out = run()
        if self._pending is not None:
            self._pending.setdefault(position, PartCost()).add(saved.total, flops.total, saved.total)
        return out

    @contextmanager
    def chunk(self, images: int) -> Iterator[None]:
        """Around one model call's forward and backward pass (``images`` images) while measuring: counts what the
        forward keeps, and takes the parts' measurements if the backward pass ran (it does not when every image
        of the call has stopped)."""
        if not self.measuring:
            yield
            return
        base = SavedBytes(self.weights)
        parts: dict[int, PartCost] = {}
        self._pending = parts
        try:
            with base.hooks():
                yield
            if parts:
                self._base += base.total
                self._images += images
                self._call_images = max(self._call_images, images)
                for position, measured in parts.items():
                    self.costs.setdefault(position, PartCost()).add(measured.kept, measured.flops, measured.peak)
        finally:
            self._pending = None

    def decide(self, device: torch.device) -> PlanSummary | None:
        """Choose the parts that keep their activations from the measurements (None while nothing is measured).
        The budget is the one given, else :data:`FREE_MEMORY_SHARE` of :func:`free_memory` now."""
        if not self.measuring or self._images == 0:
            return None
        budget = self.budget
        if budget is None:
            free = free_memory(device)
            budget = None if free is None else int(FREE_MEMORY_SHARE * free)
        s = self.fix(budget, self._call_images)
        limit = "no known memory limit" if s.budget is None else f"a budget of {round(s.budget / 2**20, 1):g} MiB"
        below = s.budget is not None and s.budget < s.floor
        _log.info("memsafe: activation checkpointing within %s%s: %d of %d UNet parts keep their activations "
                  "(%.0f MiB kept for %d image(s) per call, %.0f MiB with every part recomputed); the backward pass "
                  "recomputes %.0f%% of the parts' FLOPs", limit, " (below what recomputing every part needs)"
                  if below else "", s.kept_parts, s.parts, s.need / 2**20, s.images, s.floor / 2**20,
                  100 * s.recomputed_flops)
        return self.summary

    def fix(self, budget: int | None, images: int) -> PlanSummary:
        """:meth:`choose` and keep to that choice from now on (measuring ends)."""
        self.summary = self.choose(budget, images)
        self.keep = frozenset(self.summary.kept)
        self.measuring = False
        return self.summary

    def choose(self, budget: int | None, images: int) -> PlanSummary:
        """The parts that keep their activations within ``budget`` bytes for calls of ``images`` images (greedy
        by FLOPs per kept byte; a part that does not fit is skipped, a smaller one after it may fit). The floor
        counts the largest one-row recomputation of any part (every part's chunks stay within it,
        :meth:`rows_per_chunk`): conservative, since a kept part is not recomputed."""
        per_image = self._base / max(1, self._images)
        kept = {i: c.kept / self._images for i, c in self.costs.items()}
        floor = int(per_image * images) + max((c.peak for c in self.costs.values()), default=0)
        order = sorted(self.costs, key=lambda i: (self.costs[i].flops + 1) / (kept[i] + 1), reverse=True)
        need, chosen = floor, []
        for i in order:
            extra = int(kept[i] * images)
            if budget is None or need + extra <= budget:
                chosen.append(i)
                need += extra
        total = sum(c.flops for c in self.costs.values())
        recomputed = sum(c.flops for i, c in self.costs.items() if i not in chosen)
        share = recomputed / total if total else (len(self.costs) - len(chosen)) / max(1, len(self.costs))
        return PlanSummary(budget, images, len(self.blocks), need, floor, share, tuple(sorted(chosen)))

    def drop(self) -> None:
        """Every part checkpointed from now on (after an out-of-memory error with the plan's choice)."""
        self.keep = frozenset()
        self.measuring = False
        if self.summary is not None:
            self.summary = replace(self.summary, need=self.summary.floor, recomputed_flops=1.0, kept=())


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


def measured_plan(model: nn.Module, loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, images: int,
                  budget: int | None = None) -> CheckpointPlan:
    """A :class:`CheckpointPlan` for :func:`checkpoint_blocks` of ``model`` that has measured every part in one
    forward + backward pass of the scalar ``loss(x)`` (weights frozen, gradient with respect to ``x`` only),
    counted as ``images`` images: what ``adjust_noise``'s first iteration measures. Still measuring: its choice is
    made by :meth:`CheckpointPlan.choose`, :meth:`~CheckpointPlan.fix` or :meth:`~CheckpointPlan.decide`."""
    plan = CheckpointPlan(model, checkpoint_blocks(model), budget)
    x = x.detach().requires_grad_(True)
    with frozen_parameters(model), checkpointed(plan.blocks, plan), plan.chunk(images), torch.enable_grad():
        torch.autograd.grad(loss(x), [x])
    return plan


__all__ = ["CheckpointPlan", "PlanSummary", "SavedBytes", "checkpoint_blocks", "checkpointed", "free_memory",
           "frozen_parameters", "measured_plan", "storage_key"]
