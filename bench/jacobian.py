"""The forward-only gradient, measured (issue 6, lever 2): which direction it gives and what it costs.

    python -m bench jacobian --model lab --batch 8 --threads 1
    python -m bench jacobian --model sd15 --latent 32 --batch 1 --threads 2

The per-sample method steps along ``g = J^T u`` (``J = d eps_tilde / dz``, ``u = eps_tilde / ||eps_tilde||``, the
gradient of ``||eps_tilde||``), which takes a backward pass through the UNet. Without one, two ways give ``J u``
instead:

- ``fd``: the finite difference ``(eps_tilde(z + h u) - eps_tilde(z)) / h`` of ``gradient="finite_difference"``
  (one more no-grad forward; ``h`` is the config's ``fd_radius`` at this latent size);
- ``jvp``: a Jacobian-vector product by forward-mode autodiff (``torch.autograd.forward_ad``): exact, no ``h``,
  one forward carrying a tangent. Forward AD has no rule for the fused attention kernels (CPU flash attention,
  and xformers in the WebUIs), so it runs with PyTorch's math attention, which holds the attention matrices.

``J u == J^T u`` only where ``J`` is symmetric, as for a conservative field (``eps_tilde`` the gradient of a
scalar), which the batch-wise method's probe also assumes. This prints, per image, ``cos(J u, J^T u)`` (how far
the forward-only direction is from the gradient), ``cos(fd, jvp)`` (whether the finite difference is already the
exact ``J u``) and ``|J u| / |J^T u|``, then each way's time in no-grad CFG calls of the batch (``vjp``: a forward
under autograd plus the backward pass, weights frozen as ``adjust_noise(model=)`` freezes them; ``fd``: the one
extra forward; ``jvp``: its forward), medians over interleaved repeats, and each way's peak allocated tensor bytes
above what was alive before it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from memsafe import Guidance, guidance_from_denoiser
from memsafe.checkpointing import frozen_parameters

from . import perf
from .models import add_subject_arguments, positive, set_threads

WAYS = ("vjp", "fd", "jvp")


def _unit(d: Tensor) -> Tensor:
    return d / d.flatten(1).norm(dim=1).clamp_min(torch.finfo(d.dtype).tiny).view(-1, *([1] * (d.dim() - 1)))


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """[B] float64: the cosine between each image's ``a`` and ``b``."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(torch.finfo(torch.float64).tiny)


def transpose_product(guidance: Callable[[Tensor], Tensor], z: Tensor, u: Tensor) -> Tensor:
    """``J^T u`` per image, by one forward under autograd and one backward pass (what the per-sample method's
    autograd gradient is)."""
    z_grad = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = guidance(z_grad)
    (grad,) = torch.autograd.grad(out, [z_grad], grad_outputs=[u.to(out.dtype)])
    return grad


def finite_difference(guidance: Callable[[Tensor], Tensor], z: Tensor, u: Tensor, d: Tensor, h: float) -> Tensor:
    """``(eps_tilde(z + h u) - eps_tilde(z)) / h``, with ``d = eps_tilde(z)`` given: ``J u`` up to ``O(h)``, the
    per-sample method's ``gradient="finite_difference"`` estimate."""
    with torch.no_grad():
        return (guidance(z + h * u).float() - d.float()) / h


def forward_product(guidance: Callable[[Tensor], Tensor], z: Tensor, u: Tensor) -> Tensor:
    """``J u`` per image, exactly, by forward-mode autodiff (math attention: the fused kernels have no forward
    derivative)."""
    with torch.no_grad(), fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH):
        out = guidance(fwAD.make_dual(z, u))
        tangent = fwAD.unpack_dual(out).tangent
        if tangent is None:
            raise RuntimeError("bench jacobian: the guidance's output carries no tangent (not differentiable in z)")
        return tangent.clone()


def directions(guidance: Callable[[Tensor], Tensor], z: Tensor, h: float) -> dict[str, Tensor]:
    """``eps_tilde(z)`` (``d``), its unit ``u``, and ``J^T u`` (``vjp``), the finite difference (``fd``) and
    ``J u`` (``jvp``) at ``z``, all per image."""
    with torch.no_grad():
        d = guidance(z)
    u = _unit(d.float())
    return {"d": d, "u": u, "vjp": transpose_product(guidance, z, u), "fd": finite_difference(guidance, z, u, d, h),
            "jvp": forward_product(guidance, z, u)}


def _peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return perf._allocated_peak_cpu(run)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The per-image cosines and norm ratios, and each way's time in no-grad CFG calls (medians over
    ``args.repeats`` interleaved rounds) and peak allocated bytes."""
    subject, z, cond, uncond, config = perf.setup(args)
    denoiser = subject.denoiser
    sigma0 = float(denoiser.get_sigmas(args.steps)[0])
    guidance: Guidance = guidance_from_denoiser(denoiser, sigma0, cond, uncond, guidance_scale=perf.CFG_SCALE)
    h = config.scaled(z[0].numel()).fd_radius
    with frozen_parameters(denoiser.unet):  # as adjust_noise(model=unet) runs the backward pass
        found = directions(guidance, z, h)
        d, u = found["d"], found["u"]
        ways: dict[str, Callable[[], object]] = {
            "vjp": lambda: transpose_product(guidance, z, u),
            "fd": lambda: finite_difference(guidance, z, u, d, h),
            "jvp": lambda: forward_product(guidance, z, u),
        }

        def call() -> None:
            with torch.no_grad():
                guidance(z)

        ratios: dict[str, list[float]] = {w: [] for w in WAYS}
        for _ in range(args.repeats):
            for way in WAYS:
                seconds = []
                for fn in (call, ways[way]):
                    perf._sync(subject.device)
                    t0 = time.perf_counter()
                    fn()
                    perf._sync(subject.device)
                    seconds.append(time.perf_counter() - t0)
                ratios[way].append(seconds[1] / seconds[0])
        peaks = {"call": _peak_bytes(call, subject.device), **{w: _peak_bytes(ways[w], subject.device) for w in WAYS}}
    return {
        "fd_radius": h,
        "cos_ju_jtu": cosine(found["jvp"], found["vjp"]).tolist(),
        "cos_fd_ju": cosine(found["fd"], found["jvp"]).tolist(),
        "cos_fd_jtu": cosine(found["fd"], found["vjp"]).tolist(),
        "norm_ratio": (found["jvp"].double().flatten(1).norm(dim=1)
                       / found["vjp"].double().flatten(1).norm(dim=1)).tolist(),
        "calls": {w: statistics.median(r) for w, r in ratios.items()},
        "ranges": {w: (min(r), max(r)) for w, r in ratios.items()},
        "peak_bytes": peaks,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked: exits with a message naming the option on a bad value."""
    p = argparse.ArgumentParser(prog="python -m bench jacobian", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(p)
    p.add_argument("--steps", type=positive, default=50, help="sampler steps (sets the first noise level)")
    p.add_argument("--batch", type=positive, default=2)
    p.add_argument("--repeats", type=positive, default=5)
    perf.add_per_sample_arguments(p)
    return p.parse_args(argv)


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.3f}" for v in values) + f" (median {statistics.median(values):.3f})"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args)
    report = measure(args)
    print(f"bench jacobian: {args.model}, batch {args.batch}, {args.dtype} on {args.device}, "
          f"{torch.get_num_threads()} threads, fd radius {report['fd_radius']:.4g}")
    print(f"  cos(J u, J^T u) per image:  {_fmt(report['cos_ju_jtu'])}")
    print(f"  cos(fd, J u) per image:     {_fmt(report['cos_fd_ju'])}")
    print(f"  cos(fd, J^T u) per image:   {_fmt(report['cos_fd_jtu'])}")
    print(f"  |J u| / |J^T u| per image:  {_fmt(report['norm_ratio'])}")
    peaks = report["peak_bytes"]
    for way in WAYS:
        low, high = report["ranges"][way]
        print(f"  {way}: {report['calls'][way]:.2f} CFG calls ({low:.2f}-{high:.2f} over {args.repeats} repeats), "
              f"peak allocated {peaks[way] / 2**20:.1f} MiB ({peaks[way] / max(peaks['call'], 1):.2f}x a no-grad "
              f"call's {peaks['call'] / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
