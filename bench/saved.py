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
interleaved, and prints the median ratio: what one per-sample gradient costs in forward passes. With
``--profile N`` it says where those passes spend their time (torch.profiler, N times a forward without autograd
and a backward pass, frozen weights): seconds per operator family (attention, convolution, linear, the rest) and
each family's backward over its forward, medians over the N: the floor that no step size or batching moves.
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

from .models import add_subject_arguments, build, count, set_threads

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


def output_loss(run: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """The scalar every backward pass here differentiates: the summed squares of the UNet's output, in float32.
    It stands in for memsafe's guidance loss (a norm of the output): the same graph through the UNet."""
    return run(x).float().pow(2).sum()


def synchronizer(unet: nn.Module) -> Callable[[], None]:
    """What makes a timer see the UNet's work done: a CUDA synchronize where its weights are on a GPU, else nothing
    (CPU work is done when the call returns)."""
    return torch.cuda.synchronize if next(unet.parameters()).is_cuda else (lambda: None)


def backward_cost(unet: nn.Module, run: Callable[[Tensor], Tensor], make_x: Callable[[], Tensor], repeats: int,
                  settings: dict[str, Callable[[], AbstractContextManager[object]]]) -> dict[str, list[float]]:
    """Per setting (a context the backward pass runs in: checkpointing off, on, a plan) and repeat: the seconds
    of a forward + backward pass (frozen weights, gradient with respect to the input) over those of a forward pass
    alone (no autograd), minus one: a backward pass's cost in forward passes. Interleaved, and each setting
    against the forward pass timed just before it, so that drift in the machine's speed hits all alike."""
    sync = synchronizer(unet)
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
                    torch.autograd.grad(output_loss(run, x), [x])
                sync()
                t2 = time.perf_counter()
                ratios[name].append((t2 - t1) / (t1 - t0) - 1.0)
    return ratios


OP_FAMILIES = (  # (family, substrings of the aten operator names it takes), first match wins
    ("attention", ("attention", "softmax", "aten::bmm", "aten::baddbmm")),
    ("convolution", ("conv",)),
    ("linear", ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul")),
)


def op_family(name: str) -> str:
    """The family an operator's time counts to: ``attention``, ``convolution``, ``linear`` or ``other``."""
    name = name.lower()  # autograd nodes too: ConvolutionBackward0, ScaledDotProduct...AttentionBackward0
    return next((family for family, keys in OP_FAMILIES if any(k in name for k in keys)), "other")


def profile_passes(unet: nn.Module, run: Callable[[Tensor], Tensor], make_x: Callable[[], Tensor], repeats: int = 1
                   ) -> list[dict[str, dict[str, float]]]:
    """Per repeat, seconds per operator family of one forward pass without autograd and of the backward pass that
    follows it (frozen weights, gradient with respect to the input), after a warm-up of both: self time of the
    operators (on a GPU the time of the kernels each launched itself, else CPU time), so nothing counts twice."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = next(unet.parameters()).is_cuda
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    sync = synchronizer(unet)

    def families(prof: profile) -> dict[str, float]:
        out = {family: 0.0 for family, _ in OP_FAMILIES} | {"other": 0.0}
        for event in prof.key_averages():
            if event.device_type != DeviceType.CPU:
                continue  # a kernel's own entry: its time already counts to the operator that launched it
            us = event.self_device_time_total if cuda else event.self_cpu_time_total
            out[op_family(event.key)] += us / 1e6
        return out

    runs = []
    with frozen_parameters(unet):
        with torch.no_grad():
            run(make_x())
        x = make_x()
        torch.autograd.grad(output_loss(run, x), [x])  # warm-up: the backward's kernels, its memory
        sync()
        for _ in range(repeats):  # a forward, then a backward: seconds apart, so the machine's drift hits both
            with profile(activities=activities) as prof:
                with torch.no_grad():
                    run(make_x())
                sync()
            forward = families(prof)
            x = make_x()
            loss = output_loss(run, x)
            sync()
            with profile(activities=activities) as prof:
                torch.autograd.grad(loss, [x])
                sync()
            runs.append({"forward": forward, "backward": families(prof)})
            del loss, x
    return runs


def print_profile(runs: list[dict[str, dict[str, float]]]) -> None:
    """The :func:`profile_passes` times as lines: per family the median seconds of each pass, its share, and the
    median over repeats of its backward over its forward; first the same for the whole passes."""
    median = statistics.median
    totals = [(sum(r["forward"].values()), sum(r["backward"].values())) for r in runs]
    if not runs or any(f <= 0 or b <= 0 for f, b in totals):
        print("  profile: the profiler recorded no operator times (on a GPU: no kernels linked to operators)")
        return
    ratios = [b / f for f, b in totals]
    total_f, total_b = median([f for f, _ in totals]), median([b for _, b in totals])
    print(f"  profile (self time per operator family, median of {len(runs)} repeats of a forward without "
          f"autograd and a backward pass): forward {total_f:.3f} s, backward {total_b:.3f} s; a backward costs "
          f"{median(ratios):.2f} forwards (repeats: {', '.join(f'{r:.2f}' for r in ratios)})")
    for family in runs[0]["forward"]:
        fwd = median([r["forward"][family] for r in runs])
        bwd = median([r["backward"][family] for r in runs])
        each = [r["backward"][family] / r["forward"][family] for r in runs if r["forward"][family] > 0]
        ratio = f"{median(each):5.2f}x its forward" if each else "   - "
        print(f"    {family:12s} forward {fwd:8.3f} s ({fwd / total_f:4.0%})  backward {bwd:8.3f} s "
              f"({bwd / total_b:4.0%}), {ratio}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: exits with a message naming the option on a bad value."""
    p = argparse.ArgumentParser(prog="python -m bench saved", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(p, models=("tiny", "sd15", "sdxl"))
    p.add_argument("--time-repeats", type=count, default=0, help="also time backward against forward (N repeats)")
    p.add_argument("--budgets", default="", help="MiB, comma-separated: what checkpointing within each budget "
                   "keeps and recomputes (counted), timed with --time-repeats")
    p.add_argument("--profile", type=count, default=0, metavar="N",
                   help="also profile N forward and backward passes: time per operator family (attention, ...)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args)
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
        measured = measured_plan(unet, lambda x: output_loss(run, x), make_x(), images=1)
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

    if args.profile:
        print_profile(profile_passes(unet, run, make_x, args.profile))


if __name__ == "__main__":
    main()
