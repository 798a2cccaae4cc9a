"""What the per-sample backward pass keeps, in bytes (issue 6): the breakdown behind its peak-memory ratios.

    python -m bench saved --model sd15 --latent 64            # one image (its cond and uncond rows), fp32, CPU

One forward under autograd through a random-weight UNet (bench/models.py), counting every tensor autograd keeps
for the backward pass once (by storage; the weights themselves are not counted):

- ``trainable``: the weights require grad, as the hosts leave them (A1111 never switches it off);
- ``frozen``: memsafe's ``adjust_noise(model=unet)`` (memsafe.checkpointing.frozen_parameters);
- ``checkpointed``: frozen and the UNet's parts checkpointed (``checkpointing="always"``): what stays is the
  parts' inputs plus what the layers between the parts save; the backward pass then recomputes one part at a
  time, one row at a time, so the largest part's own saved bytes for one row come on top at its turn.

Counts, not timings: exact on any machine. Transient buffers (a kernel's workspace, the gradients flowing back)
are not in it; ``python -m bench perf --memory-only`` measures the whole peak. With ``--time-repeats N`` it also
times a forward pass against a forward + backward pass (frozen weights, gradient with respect to the input only),
interleaved, and prints the median ratio: what one per-sample gradient costs in forward passes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import partial

import torch
from torch import Tensor, nn

from memsafe.checkpointing import (
    CheckpointPlan,
    SavedBytes,
    checkpoint_blocks,
    checkpointed,
    frozen_parameters,
    measured_plan,
)
from memsafe.guidance import tensors_in

from .models import add_subject_arguments, build

MiB = 2**20


def saved_bytes(unet: nn.Module, forward: Callable[[], Tensor]) -> dict[str, int]:
    """The breakdown (bytes) for one forward ``forward()`` of ``unet`` under autograd."""
    unet.requires_grad_(True)
    trainable = SavedBytes.excluding_weights(unet)
    with trainable.hooks():
        forward()
    out = {"trainable": trainable.total}
    with frozen_parameters(unet):
        frozen = SavedBytes.excluding_weights(unet)
        with frozen.hooks():
            forward()
        out["frozen"] = frozen.total
        # checkpointed: each part keeps its inputs; the layers between the parts keep what they save
        parts = checkpoint_blocks(unet)
        inputs, between = SavedBytes.excluding_weights(unet), SavedBytes.excluding_weights(unet)
        own: list[SavedBytes] = []  # per part run: what it saves itself (what its recomputation holds)
        running: list[SavedBytes] = []

        def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
            for t in tensors_in((args, kwargs)):
                inputs.add(t)
            own.append(SavedBytes.excluding_weights(unet))
            running.append(own[-1])

        def leave(module: nn.Module, args: tuple, kwargs: dict, result: object) -> None:
            running.pop()

        def pack(t: Tensor) -> Tensor:
            (running[-1] if running else between).add(t)
            return t.detach()  # not t itself: that would leak the graph (SavedBytes.pack)

        handles = [h for part in parts for h in (part.register_forward_pre_hook(enter, with_kwargs=True),
                                                 part.register_forward_hook(leave, with_kwargs=True))]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                forward()
        finally:
            for h in handles:
                h.remove()
        out["checkpointed"] = sum({**inputs.storages, **between.storages}.values())  # a storage counts once
        out["part_inputs"] = inputs.total
        out["largest_part"] = max(s.total for s in own)
        out["parts"] = len(parts)
    return out


def backward_cost(unet: nn.Module, run: Callable[[Tensor], Tensor], make_x: Callable[[], Tensor], repeats: int,
                  settings: dict[str, Callable[[], AbstractContextManager[object]]]) -> dict[str, list[float]]:
    """Per setting (a context the backward pass runs in: checkpointing off, on, a plan) and repeat: the seconds
    of a forward + backward pass (frozen weights, gradient with respect to the input) over those of a forward pass
    alone (no autograd), minus one: a backward pass's cost in forward passes. Interleaved, and each setting
    against the forward pass timed just before it, so that drift in the machine's speed hits all alike."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    ratios: dict[str, list[float]] = {name: [] for name in settings}
    with frozen_parameters(unet):
        for r in range(repeats):
            names = list(settings)
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotated order
                x = make_x()
                sync()
                t0 = time.perf_counter()
                with torch.no_grad():
                    run(x)
                sync()
                t1 = time.perf_counter()
                with torch.enable_grad(), settings[name]():
                    torch.autograd.grad(run(x).float().pow(2).sum(), [x])
                sync()
                t2 = time.perf_counter()
                ratios[name].append((t2 - t1) / (t1 - t0) - 1.0)
    return ratios


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench saved", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(p, models=("tiny", "sd15", "sdxl"))
    p.add_argument("--time-repeats", type=int, default=0, help="also time backward against forward (N repeats)")
    p.add_argument("--budgets", default="", help="MiB, comma-separated: what checkpointing within each budget "
                   "keeps and recomputes (counted), timed with --time-repeats")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    subject = build(args.model, args.device, getattr(torch, args.dtype), latent=args.latent)
    cond, uncond = subject.conditioning(1, seed=99)
    both = {k: torch.cat([cond[k], uncond[k]]) if isinstance(cond[k], Tensor)
            else {n: torch.cat([cond[k][n], uncond[k][n]]) for n in cond[k]} for k in cond}
    z = torch.randn(1, *subject.latent, generator=torch.Generator().manual_seed(1234)).to(subject.device)
    sigma = subject.denoiser.get_sigmas(50)[:1].to(subject.device)

    def make_x() -> Tensor:
        return (z * sigma).requires_grad_(True)

    def run(x: Tensor) -> Tensor:  # one image: its cond and uncond rows in one call, as memsafe evaluates it
        return subject.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)

    unet = subject.denoiser.unet
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    with torch.enable_grad():
        b = saved_bytes(unet, lambda: run(make_x()))
        # memsafe's recompute runs one row at a time (frozen weights): the largest part of a one-row call
        one_row = saved_bytes(unet, lambda: subject.denoiser(make_x(), sigma, **cond))["largest_part"]
    print(f"bench saved: {args.model} {subject.latent} {args.dtype} on {args.device}, one image (2 rows); "
          f"weights {weights / MiB:.0f} MiB")
    print(f"  kept for backward, weights trainable: {b['trainable'] / MiB:9.1f} MiB")
    print(f"  kept for backward, weights frozen   : {b['frozen'] / MiB:9.1f} MiB "
          f"({1 - b['frozen'] / b['trainable']:.0%} less)")
    print(f"  frozen and checkpointed ({b['parts']} parts): {b['checkpointed'] / MiB:9.1f} MiB kept "
          f"({b['part_inputs'] / MiB:.1f} of them the parts' inputs), "
          f"+ {b['largest_part'] / MiB:.1f} MiB while the largest part is recomputed for both rows at once, "
          f"{one_row / MiB:.1f} MiB row by row (what memsafe does)")
    budgets = [int(float(b) * MiB) for b in args.budgets.split(",") if b.strip()]
    plans: dict[str, CheckpointPlan] = {}
    if budgets:
        measured = measured_plan(unet, lambda x: run(x).float().pow(2).sum(), make_x(), images=1)
        print("  checkpointing within a budget (memsafe's choice, counted for one image; the floor includes the "
              "largest recomputation):")
        for budget in budgets:
            plan = copy.copy(measured)
            s = plan.fix(budget, 1)
            plans[f"budget {budget / MiB:g} MiB"] = plan
            print(f"    budget {budget / MiB:7g} MiB: {s.kept_parts:2d} of {s.parts} parts keep their activations, "
                  f"{s.need / MiB:7.1f} MiB kept (floor {s.floor / MiB:.1f}), {s.recomputed_flops:6.1%} of the parts' "
                  f"FLOPs recomputed")
    if args.time_repeats:
        with torch.no_grad():
            run(make_x())  # warm-up
        parts = checkpoint_blocks(unet)
        settings: dict[str, Callable[[], AbstractContextManager[object]]] = {
            "no checkpointing": nullcontext, "every part checkpointed": partial(checkpointed, parts)}
        settings.update({name: partial(checkpointed, parts, plan) for name, plan in plans.items()})
        for name, ratios in backward_cost(unet, run, make_x, args.time_repeats, settings).items():
            print(f"  {name}: a backward pass costs {statistics.median(ratios):.2f} forward passes (median of "
                  f"{len(ratios)}: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
