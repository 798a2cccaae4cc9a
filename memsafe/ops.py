"""The per-iteration math of the mitigation methods, outside the model.

Every op has a pure-PyTorch reference (``*_ref``) and a public name that dispatches to the selected backend.
The references are the specification: a compiled backend must return the same numbers within the per-dtype
tolerances of the tests. All ops work per image: an image's result depends only on its own rows.

Conventions:
- ``eps_cond``/``eps_uncond``/``diff`` may be float32, float16 or bfloat16; norms are accumulated and returned in
  float32. ``z``, ``grad``, ``exp_avg``, ``exp_avg_sq`` are float32 (the working space of memsafe).
- ``active`` is a bool tensor ``[B]`` on the same device; ``step`` an int64 tensor ``[B]`` (AdamW step counts).
- An image whose guidance difference is exactly zero has no direction: its probe and seed are zero.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class DiffNorm(NamedTuple):
    """Result of :func:`guidance_diff_norm`."""

    diff: Tensor  # eps_cond - eps_uncond, dtype of the inputs
    norms: Tensor  # [B] float32, ||diff|| per image
    probe: Tensor | None  # rho * diff / ||diff|| (float32), when rho was given
    seed: Tensor | None  # diff / ||diff|| for active images, 0 elsewhere (float32), when active was given


def _per_image(v: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-image vector ``[B]`` against ``x`` of shape ``[B, ...]``."""
    return v.view((-1,) + (1,) * (x.dim() - 1))


def _safe_inverse(norms: Tensor) -> Tensor:
    """1/norm, and 0 where the norm is 0 (no direction: the probe and the seed are zero)."""
    return torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(norms))


def guidance_diff_norm_ref(
    eps_cond: Tensor, eps_uncond: Tensor, *, rho: float | None = None, active: Tensor | None = None
) -> DiffNorm:
    """``diff = eps_cond - eps_uncond`` and its per-image L2 norm (float32 accumulation).

    With ``rho``, also the batch-wise probe ``rho * diff / ||diff||``; with ``active``, also the backward seed
    ``diff / ||diff||`` (the gradient of ``||diff||`` with respect to ``diff``) for active images, zero for the others.
    """
    diff = eps_cond - eps_uncond
    d32 = diff.float()
    norms = d32.flatten(1).norm(dim=1)
    inv = _per_image(_safe_inverse(norms), d32)
    probe = d32 * (inv * rho) if rho is not None else None
    seed = d32 * (inv * _per_image(active.to(d32.dtype), d32)) if active is not None else None
    return DiffNorm(diff, norms, probe, seed)


def batchwise_update_ref(z: Tensor, diff_probe: Tensor, diff: Tensor, gamma: float) -> Tensor:
    """In place: ``z -= gamma * (diff_probe - diff)`` (paper Alg. 1, line 5). Returns ``z``."""
    return z.sub_((diff_probe.float() - diff.float()).mul_(gamma))


def adamw_step_ref(
    z: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    active: Tensor,
    *,
    lr: float,
    weight_decay: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> None:
    """One AdamW step per ACTIVE image, in place on ``z``, ``exp_avg``, ``exp_avg_sq`` and ``step``.

    Exactly ``torch.optim.AdamW`` (decoupled weight decay, bias correction by the image's own step count) applied
    to each active image as if it were optimized alone; inactive images are left bit-identical.
    """
    new_step = step + active.long()
    t = new_step.clamp_min(1).double()
    bias1 = _per_image((1 - beta1**t).float(), z)
    bias2_sqrt = _per_image((1 - beta2**t).sqrt().float(), z)
    mask = _per_image(active, z)

    m = exp_avg * beta1 + grad * (1 - beta1)
    v = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    decayed = z * (1 - lr * weight_decay)
    updated = decayed - (lr / bias1) * m / (v.sqrt() / bias2_sqrt + eps)

    z.copy_(torch.where(mask, updated, z))
    exp_avg.copy_(torch.where(mask, m, exp_avg))
    exp_avg_sq.copy_(torch.where(mask, v, exp_avg_sq))
    step.copy_(new_step)


def stop_test_ref(norms: Tensor, step: Tensor, active: Tensor, target: float, max_iterations: int) -> Tensor:
    """Images still to optimize: active, above the target and with steps left (a new bool tensor)."""
    return active & (norms > target) & (step < max_iterations)


# -- dispatch -----------------------------------------------------------------------------------------------------
# Per call: CUDA tensors -> the CUDA extension, CPU tensors -> the C++ extension, when loaded (memsafe/_backend.py
# loads them lazily on the first call, once); anything a compiled op does not cover (other dtypes, shapes that do
# not match, autograd, empty tensors, other devices) -> the reference above, so callers never see a difference.

_CPU_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/memsafe_ops_cpu.cpp DType


def backend_info(load: bool = False) -> dict:
    """What serves the ops: ``backend`` ("cuda", "cpp", "reference"; None before the first op call unless
    ``load``), ``reason`` (the line that was logged), which backend CPU and CUDA tensors get, the build folders
    and the source hash. JSON-ready. ``load=True`` loads (and may JIT-build) as the first op call would."""
    return _loader().info(load=load)


def reset_backend() -> None:
    """Forget the loaded backend: the next op call reads ``MEMSAFE_OPS_BACKEND`` again and loads once more (with
    its one log line). For a setting that changes the backend at run time; builds stay cached on disk."""
    _loader().reset()


_backend_module = None


def _loader():
    """memsafe._backend, imported on first use: `import memsafe` stays as light as before, and
    `python -m memsafe._backend` runs without a second copy of the module."""
    global _backend_module
    if _backend_module is None:
        from . import _backend

        _backend_module = _backend
    return _backend_module


def _module_for(t: Tensor):
    """The extension module serving ``t``'s device, or None (reference)."""
    state = _loader().get()
    kind = t.device.type
    if kind == "cuda":
        return state.cuda
    if kind == "cpu":
        return state.cpu
    return None


def _grad_involved(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _is_mask(mask: Tensor, images: int, device: torch.device, dtype: torch.dtype) -> bool:
    return mask.dtype == dtype and mask.dim() == 1 and mask.shape[0] == images and mask.device == device


def _check_out(out: DiffNorm, a: Tensor, rho: float | None, active: Tensor | None) -> None:
    """``out`` must hold exactly the buffers the call produces (contiguous, right dtype, shape and device)."""
    float32 = torch.float32
    want = (
        ("diff", out.diff, a.dtype, a.shape),
        ("norms", out.norms, float32, a.shape[:1]),
        ("probe", out.probe, float32, a.shape) if rho is not None else None,
        ("seed", out.seed, float32, a.shape) if active is not None else None,
    )
    for item in want:
        if item is None:
            continue
        name, t, dtype, shape = item
        if t is None or t.dtype != dtype or t.shape != shape or t.device != a.device or not t.is_contiguous():
            got = "None" if t is None else f"{t.dtype} {tuple(t.shape)} on {t.device}"
            raise ValueError(
                f"memsafe: guidance_diff_norm out.{name} must be a contiguous {dtype} tensor of shape "
                f"{tuple(shape)} on {a.device}, got {got}"
            )


def _run_diff_norm(
    module,
    device: str | torch.device,
    a: Tensor,
    b: Tensor,
    rho: float | None,
    active: Tensor | None,
    out: DiffNorm | None = None,
) -> DiffNorm:
    """The compiled diff+norm (inputs already checked: same dtype/shape/device, supported dtype, non-empty)."""
    if a.is_cuda:
        outs = (None,) * 4 if out is None else tuple(out)
        return DiffNorm(*module.diff_norm(a, b, None if rho is None else float(rho), active, *outs))
    a, b = a.contiguous(), b.contiguous()
    images = a.shape[0]
    if out is None:
        # empty_like of the contiguous input: contiguous, and a third of the cost of torch.empty(shape)
        diff = torch.empty_like(a)
        norms = torch.empty(images, dtype=torch.float32)
        probe = torch.empty_like(a, dtype=torch.float32) if rho is not None else None
        seed = torch.empty_like(a, dtype=torch.float32) if active is not None else None
    else:
        diff, norms = out.diff, out.norms
        probe = out.probe if rho is not None else None
        seed = out.seed if active is not None else None
    mask = active.contiguous() if active is not None else None
    module.diff_norm(
        _CPU_DTYPE_CODES[a.dtype],
        a.data_ptr(),
        b.data_ptr(),
        diff.data_ptr(),
        norms.data_ptr(),
        0 if probe is None else probe.data_ptr(),
        0 if seed is None else seed.data_ptr(),
        0 if mask is None else mask.data_ptr(),
        images,
        a.numel() // images,
        0.0 if rho is None else float(rho),
    )
    return DiffNorm(diff, norms, probe, seed)


def guidance_diff_norm(
    eps_cond: Tensor,
    eps_uncond: Tensor,
    *,
    rho: float | None = None,
    active: Tensor | None = None,
    out: DiffNorm | None = None,
) -> DiffNorm:
    """:func:`guidance_diff_norm_ref`, fused: the difference and its norms in one pass over the inputs, the probe
    and the seed in a second pass over the difference (float32, float16, bfloat16 inputs; float32 norms).

    ``out``: optional buffers to write into (a :class:`DiffNorm` with ``diff`` in the inputs' dtype and shape,
    ``norms`` float32 ``[B]``, ``probe``/``seed`` float32 where ``rho``/``active`` are given; contiguous, on the
    inputs' device); the result then holds these very tensors."""
    if out is not None:
        _check_out(out, eps_cond, rho, active)
    if (
        eps_cond.dtype in _CPU_DTYPE_CODES
        and eps_uncond.dtype == eps_cond.dtype
        and eps_uncond.shape == eps_cond.shape
        and eps_uncond.device == eps_cond.device
        and eps_cond.dim() >= 1
        and eps_cond.numel() > 0
        and (active is None or _is_mask(active, eps_cond.shape[0], eps_cond.device, torch.bool))
        and not _grad_involved(eps_cond, eps_uncond)
    ):
        module = _module_for(eps_cond)
        if module is not None:
            return _run_diff_norm(module, eps_cond.device, eps_cond, eps_uncond, rho, active, out)
    result = guidance_diff_norm_ref(eps_cond, eps_uncond, rho=rho, active=active)
    if out is None:
        return result
    with torch.no_grad():
        for dst, src in zip(out, result, strict=True):
            if dst is not None and src is not None:
                dst.copy_(src)
    return DiffNorm(
        out.diff, out.norms, out.probe if rho is not None else None, out.seed if active is not None else None
    )


def batchwise_update_(z: Tensor, diff_probe: Tensor, diff: Tensor, gamma: float) -> Tensor:
    """:func:`batchwise_update_ref`, fused (one pass; ``z`` float32 and contiguous, the differences in any of
    float32, float16, bfloat16). Returns ``z``."""
    if (
        z.dtype == torch.float32
        and z.is_contiguous()
        and z.numel() > 0
        and diff.dtype in _CPU_DTYPE_CODES
        and diff_probe.dtype == diff.dtype
        and diff_probe.shape == z.shape
        and diff.shape == z.shape
        and diff_probe.device == z.device
        and diff.device == z.device
        and not _grad_involved(z, diff_probe, diff)
    ):
        module = _module_for(z)
        if module is not None:
            if z.is_cuda:
                module.batchwise_update(z, diff_probe, diff, float(gamma))
                return z
            dp, d = diff_probe.contiguous(), diff.contiguous()
            module.batchwise_update(
                _CPU_DTYPE_CODES[d.dtype], z.data_ptr(), dp.data_ptr(), d.data_ptr(), z.numel(), float(gamma)
            )
            return z
    return batchwise_update_ref(z, diff_probe, diff, gamma)


def adamw_step_(
    z: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    active: Tensor,
    *,
    lr: float,
    weight_decay: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
) -> None:
    """:func:`adamw_step_ref`, fused: one pass over the active images (inactive ones are not even read), per-image
    bias corrections, in place on ``z``, ``exp_avg``, ``exp_avg_sq`` (float32, contiguous) and ``step``."""
    if (
        z.dim() >= 1
        and z.numel() > 0
        and all(
            t.dtype == torch.float32 and t.shape == z.shape and t.device == z.device
            for t in (grad, exp_avg, exp_avg_sq)
        )
        and z.dtype == torch.float32
        and z.is_contiguous()
        and exp_avg.is_contiguous()
        and exp_avg_sq.is_contiguous()
        and step.is_contiguous()
        and _is_mask(step, z.shape[0], z.device, torch.int64)
        and _is_mask(active, z.shape[0], z.device, torch.bool)
        and not _grad_involved(z, grad, exp_avg, exp_avg_sq)
    ):
        module = _module_for(z)
        if module is not None:
            if z.is_cuda:
                hyper = (float(lr), float(weight_decay), float(beta1), float(beta2), float(eps))
                module.adamw_step(z, grad, exp_avg, exp_avg_sq, step, active, *hyper)
                return
            g, mask = grad.contiguous(), active.contiguous()
            module.adamw_step(
                z.data_ptr(),
                g.data_ptr(),
                exp_avg.data_ptr(),
                exp_avg_sq.data_ptr(),
                step.data_ptr(),
                mask.data_ptr(),
                z.shape[0],
                z.numel() // z.shape[0],
                float(lr),
                float(weight_decay),
                float(beta1),
                float(beta2),
                float(eps),
            )
            return
    kw = {"lr": lr, "weight_decay": weight_decay, "beta1": beta1, "beta2": beta2, "eps": eps}
    adamw_step_ref(z, grad, exp_avg, exp_avg_sq, step, active, **kw)


def stop_test(norms: Tensor, step: Tensor, active: Tensor, target: float, max_iterations: int) -> Tensor:
    """:func:`stop_test_ref` in one kernel on the tensors' device (no host synchronisation)."""
    images = norms.shape[0] if norms.dim() == 1 else -1
    if (
        images > 0
        and _is_mask(norms, images, norms.device, torch.float32)
        and _is_mask(step, images, norms.device, torch.int64)
        and _is_mask(active, images, norms.device, torch.bool)
    ):
        module = _module_for(norms)
        if module is not None:
            if norms.is_cuda:
                return module.stop_test(norms, step, active, float(target), int(max_iterations))
            keep = torch.empty(images, dtype=torch.bool)
            n, s, a = norms.contiguous(), step.contiguous(), active.contiguous()
            pointers = (n.data_ptr(), s.data_ptr(), a.data_ptr(), keep.data_ptr())
            module.stop_test(*pointers, images, float(target), int(max_iterations))
            return keep
    return stop_test_ref(norms, step, active, target, max_iterations)
