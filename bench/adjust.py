"""What one adjustment costs, in the sampler's own model calls (issue 6).

    python -m bench adjust --model sd15 --latent 8 --batch 2 --steps 20 --target-ratio 0.9 --max-iterations 3
    python -m bench adjust --model lab --batch 8 --steps 50 --method batch_wise

``bench perf`` times whole generations, whose 20-50 sampler steps carry this machine's drift (10-40% within
minutes) into every ratio. Here one adjustment (``adjust_noise`` with a per-sample variant or the batch-wise
method, as ``bench perf`` runs it) is timed against two no-grad CFG calls of the whole batch made just before
it (the sampler's call at its first noise level), interleaved over repeats, so the drift between them is
seconds, not minutes. It prints the adjustment's iterations, its whole-UNet calls (without autograd / under
autograd / backward passes, ``bench.perf.UNetCalls``), whether the sampler's first call is then taken from the
last check (as ``CFGDenoiser(reuse=...)`` does), and the predicted time ratio of a generation with ``steps``
sampler calls: ``1 + (adjustment in calls - reused calls) / steps``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from memsafe import CFGDenoiser, Guidance, adjust_noise, guidance_from_denoiser
from memsafe.methods import AdjustResult

from . import perf
from .models import add_subject_arguments, positive, set_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: exits with a message naming the option on a bad value."""
    p = argparse.ArgumentParser(prog="python -m bench adjust", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(p)
    p.add_argument("--steps", type=positive, default=50, help="sampler steps the prediction is for")
    p.add_argument("--batch", type=positive, default=2)
    p.add_argument("--repeats", type=positive, default=4)
    p.add_argument("--method", default="per_sample_polyak",
                   help=f"batch_wise or a per-sample variant of bench perf: {perf.PER_SAMPLE_FORMS}")
    perf.add_per_sample_arguments(p)
    args = p.parse_args(argv)
    if args.method != "batch_wise" and perf.PER_SAMPLE_VARIANT.fullmatch(args.method) is None:
        p.error(f"--method {args.method!r}: allowed are batch_wise and the per-sample variants "
                f"{perf.PER_SAMPLE_FORMS}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args)
    report = measure(args)
    print(f"bench adjust: {args.model} {args.method}, batch {args.batch}, {args.dtype} on {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"  iterations per image: {report['iterations']}")
    print(f"  whole-UNet calls: {report['unet_calls']} without autograd, {report['unet_grad_calls']} under autograd, "
          f"{report['unet_backward_calls']} backward passes; sampler's first call reused: {report['reused']}")
    print("  one CFG call of the batch: " + ", ".join(f"{t:.3f}" for t in report["call_seconds"]) + " s")
    print("  adjustment in CFG calls: " + ", ".join(f"{r:.2f}" for r in report["ratios"])
          + f" (median {report['calls']:.2f})")
    print(f"  predicted time ratio at {args.steps} steps: {report['predicted_ratio']:.3f}")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Times one adjustment against the CFG calls made just before it, ``args.repeats`` times; returns the
    per-repeat ratios, their median, the UNet call counts of one adjustment and the predicted time ratio."""
    subject, z, cond, uncond, config = perf.setup(args)
    denoiser = subject.denoiser
    sigmas = denoiser.get_sigmas(args.steps).to(subject.device)
    sigma0 = float(sigmas[0])
    variant, options = perf.adjustment(args.method, config, denoiser.unet)  # as bench perf runs it

    def adjust() -> tuple[AdjustResult, Guidance]:
        guidance = guidance_from_denoiser(denoiser, sigma0, cond, uncond, guidance_scale=perf.CFG_SCALE)
        return adjust_noise(z, guidance, variant, **options), guidance

    def cfg_call(x: torch.Tensor, reuse: Guidance | None = None) -> CFGDenoiser:
        model = CFGDenoiser(denoiser, cond, uncond, perf.CFG_SCALE, sigmas=sigmas, reuse=reuse)
        with torch.no_grad():
            model(x * sigma0, sigmas[0].expand(x.shape[0]))
        return model

    cfg_call(z)  # warm-up
    with perf.UNetCalls(denoiser.unet) as counted:
        result, guidance = adjust()
    first = cfg_call(result.z, reuse=guidance)  # the sampler's first call: taken from the last check?
    call_seconds, ratios = [], []
    for _ in range(args.repeats):
        perf._sync(subject.device)
        t0 = time.perf_counter()
        cfg_call(z)
        cfg_call(z)
        perf._sync(subject.device)
        t1 = time.perf_counter()
        adjust()
        perf._sync(subject.device)
        t2 = time.perf_counter()
        call_seconds.append((t1 - t0) / 2)
        ratios.append((t2 - t1) / call_seconds[-1])
    calls = statistics.median(ratios)
    return {"iterations": result.iterations.tolist(), **counted.as_row(), "reused": first.reused, "call_seconds": call_seconds,
            "ratios": ratios, "calls": calls, "predicted_ratio": 1.0 + (calls - first.reused) / args.steps}


if __name__ == "__main__":
    main()
