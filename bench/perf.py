"""Cost of each method against plain generation, measured side by side in one run (issue 6).

For one model: plain CFG sampling and every method on the same seeds, steps and batch; prints and records
time ratios (each repeat's time against plain's in the same sweep, median over interleaved repeats whose order
rotates; on the CPU the same for the process's CPU time too), peak-memory ratios (CUDA: max allocated, in process; CPU: peak RSS of
a fresh child process per method, since RSS never shrinks within a process) and model evaluations per image.

    python -m bench perf --model sd15 --latent 8 --steps 20 --batch 2     # CPU, SD1.5-size UNet
    python -m bench perf --model sd15 --device cuda --dtype float16       # GPU, 4x64x64
    python -m bench perf --model lab                                       # the lab model + replication/alignment

Rows go to bench/results/perf.json (merged by model, device, method, batch) and bench/results/perf.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import memsafe
from memsafe import CFGDenoiser, MitigationConfig, adjust_noise, guidance_from_denoiser

from .models import CONFIGS, Subject, add_subject_arguments, build, positive, sample_euler, set_threads

RESULTS = Path(__file__).resolve().parent / "results"
# per_sample* variants: per_sample[_fd][_polyak[_step<S>][_hold<N>]][_checkpointed|_budget[MiB]][_one]; AdamW
# unless _polyak (_step0.1: max_step 0.1, _hold2: hold_norm_steps 2), autograd gradients unless _fd (the
# forward-only finite-difference estimate); _checkpointed recomputes every
# part of the UNet in the backward pass (memsafe.checkpointing), _budget500 only what does not fit in 500 MiB of
# kept activations (_budget alone: within the free memory), _one evaluates one image per model call (max_batch=1);
# each gives the same images as the variant without it (up to round-off)
PER_SAMPLE_FORMS = "per_sample[_fd][_polyak[_step<S>][_hold<N>]][_checkpointed|_budget[MiB]][_one]"  # for people
PER_SAMPLE_VARIANT = re.compile(r"per_sample(?P<fd>_fd)?"
                                r"(?P<polyak>_polyak(?:_step(?P<step>\d+(?:\.\d+)?))?(?:_hold(?P<hold>\d+))?)?"
                                r"(?P<recompute>_checkpointed|_budget(?P<mib>\d+)?)?(?P<one>_one)?")
PER_SAMPLE = ("per_sample", "per_sample_fd", "per_sample_fd_polyak", "per_sample_polyak", "per_sample_checkpointed",
              "per_sample_polyak_checkpointed", "per_sample_polyak_checkpointed_one")
METHODS = ("plain", "batch_wise", "per_sample_exact", *PER_SAMPLE, "per_sample_polyak_budget", "auto_safe",
           "auto_safe_no_reuse")
CFG_SCALE = 7.0


# -- the paper-exact per-sample method (the reference the faster variants are measured against) ----------------
def per_sample_exact(z: Tensor, guidance: memsafe.Guidance, config: MitigationConfig) -> tuple[Tensor, int, int]:
    """The official code's loop (adj_init_noise_per_sample): ONE image at a time, torch.optim.AdamW on the noise,
    loss = ||eps_c - eps_u||, ``loss.item() <= target`` checked before each step. Gradients are taken with
    respect to the noise only (torch.autograd.grad), not the model's weights. Returns (z, forwards, backwards)."""
    target = config.scaled(z[0].numel()).target
    out, forwards, backwards = [], 0, 0
    for i in range(z.shape[0]):
        one = guidance.select(torch.tensor([i]))
        x = z[i : i + 1].detach().clone().requires_grad_(True)
        opt = torch.optim.AdamW([x], lr=config.lr, weight_decay=config.weight_decay)
        for _ in range(config.max_iterations):
            with torch.enable_grad():
                loss = one(x).float().norm()
            forwards += 1
            if loss.item() <= target:
                break
            (x.grad,) = torch.autograd.grad(loss, [x])
            backwards += 1
            opt.step()
        out.append(x.detach())
    return torch.cat(out), forwards, backwards


def per_sample_variant(method: str, config: MitigationConfig) -> tuple[MitigationConfig, dict[str, Any]]:
    """The config and the ``adjust_noise`` options (checkpointing, memory_budget, max_batch) that a per_sample*
    bench name stands for, on top of ``config`` (its target, lr, ...). Raises ValueError on another name."""
    parts = PER_SAMPLE_VARIANT.fullmatch(method)
    if parts is None:
        raise ValueError(f"{method!r} is not a per_sample variant: {PER_SAMPLE_FORMS}")
    variant = config.replace(method="per_sample", gradient="finite_difference" if parts["fd"] else "autograd",
                             optimizer="polyak" if parts["polyak"] else "adamw")
    if parts["step"]:
        variant = variant.replace(max_step=float(parts["step"]))
    if parts["hold"]:
        variant = variant.replace(hold_norm_steps=int(parts["hold"]))
    recompute = parts["recompute"] or ""
    mode = "always" if recompute == "_checkpointed" else "budget" if recompute else "never"
    return variant, {"checkpointing": mode, "memory_budget": int(parts["mib"]) * 2**20 if parts["mib"] else None,
                     "max_batch": 1 if parts["one"] else None}


def adjustment(method: str, config: MitigationConfig, unet: torch.nn.Module
               ) -> tuple[MitigationConfig, dict[str, Any]]:
    """The config and ``adjust_noise`` options that bench runs ``method`` with: ``batch_wise`` (the config's
    iterations, no risk measured after) or a per_sample variant on the frozen ``unet``
    (:func:`per_sample_variant`). ``bench perf`` and ``bench adjust`` both take them from here."""
    if method == "batch_wise":
        return config.replace(method="batch_wise"), {"measure_after": False}
    variant, options = per_sample_variant(method, config)
    return variant, {"model": unet, **options}


# -- one generation with one method ------------------------------------------------------------------------------
class UNetCalls:
    """Counts the whole-UNet calls made while it is entered: ``calls`` without autograd (sampler steps,
    batch-wise, checks made without a gradient), ``grad_calls`` under autograd, ``backward_calls`` the backward
    passes through one of those (a check that stops an image has none), and the model rows (2 per image under
    CFG) of each kind. Where a call's cost is set by the weights more than by its rows (small latents, small
    batches, one thread), a call costs about the same with one image as with all, so these counts, not the
    per-image evaluations, are what the time follows once images stop after different numbers of iterations. A
    checkpointed part's recomputation is not a whole call and is not counted."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.calls = self.rows = self.grad_calls = self.grad_rows = self.backward_calls = 0

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        rows = (args[0] if args else kwargs["sample"]).shape[0]
        out = output if isinstance(output, Tensor) else getattr(output, "sample", None)
        if out is None:
            out = output[0]  # diffusers with return_dict=False
        if not (torch.is_grad_enabled() and out.requires_grad):
            self.calls, self.rows = self.calls + 1, self.rows + rows
            return
        self.grad_calls, self.grad_rows = self.grad_calls + 1, self.grad_rows + rows
        out.register_hook(self._count_backward)  # runs when a backward pass reaches this call's output

    def _count_backward(self, grad: Tensor) -> None:
        self.backward_calls += 1

    def __enter__(self) -> UNetCalls:
        self._handle = self.unet.register_forward_hook(self._count, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def as_row(self) -> dict[str, int]:
        return {"unet_calls": self.calls, "unet_rows": self.rows, "unet_grad_calls": self.grad_calls,
                "unet_grad_rows": self.grad_rows, "unet_backward_calls": self.backward_calls}


def generate(subject: Subject, method: str, z: Tensor, cond: dict, uncond: dict, steps: int,
             config: MitigationConfig) -> dict[str, Any]:
    """Images from noise ``z`` with ``method``; returns the images, the model evaluations per image and the
    whole-UNet calls (:class:`UNetCalls`)."""
    with UNetCalls(subject.denoiser.unet) as unet_calls:
        out = _generate(subject, method, z, cond, uncond, steps, config)
    return {**out, **unet_calls.as_row()}


def _generate(subject: Subject, method: str, z: Tensor, cond: dict, uncond: dict, steps: int,
              config: MitigationConfig) -> dict[str, Any]:
    denoiser = subject.denoiser
    sigmas = denoiser.get_sigmas(steps).to(subject.device)
    sigma0 = float(sigmas[0])
    g = guidance_from_denoiser(denoiser, sigma0, cond, uncond, guidance_scale=CFG_SCALE)
    batch = z.shape[0]
    uncond_steps, uncond_images, reuse = 0, None, None
    forward = backward = 0
    iterations = 0.0
    if method == "batch_wise":
        variant, options = adjustment(method, config, denoiser.unet)
        res = adjust_noise(z, g, variant, **options)
        z, uncond_steps, uncond_images = res.z, config.uncond_steps, res.uncond_images
        forward, backward = res.evaluations.forward, res.evaluations.backward
    elif method == "per_sample_exact":
        z, forward, backward = per_sample_exact(z, g, config)
    elif PER_SAMPLE_VARIANT.fullmatch(method) is not None:
        variant, options = adjustment(method, config, denoiser.unet)
        res = adjust_noise(z, g, variant, **options)
        z, forward, backward = res.z, res.evaluations.forward, res.evaluations.backward
        iterations = float(res.iterations.float().mean())
        reuse = g  # each image's last check, where it stopped, is the sampler's first call
    elif method in ("auto_safe", "auto_safe_no_reuse"):
        res = adjust_noise(z, g, config.replace(method="auto", risk_threshold=1e6))  # not at risk: nothing moves
        z, forward = res.z, res.evaluations.forward
        reuse = g if method == "auto_safe" else None
    model = CFGDenoiser(denoiser, cond, uncond, CFG_SCALE, sigmas=sigmas, uncond_steps=uncond_steps,
                        uncond_images=uncond_images, reuse=reuse)
    images = sample_euler(model, z * sigma0, sigmas)
    sampling = model.calls  # batched CFG calls, each = one evaluation per image
    # evaluations: image-level cond+uncond model passes (forward), vector-Jacobian products (backward, each
    # about twice a forward), and the sampler's CFG calls
    return {"images": images, "evaluations_per_image": (forward + backward) / batch + sampling,
            "forward_per_image": forward / batch, "backward_per_image": backward / batch,
            "sampling_calls": sampling, "reused_calls": model.reused, "iterations_mean": iterations}


def setup(args: argparse.Namespace) -> tuple[Subject, Tensor, dict, dict, MitigationConfig]:
    dtype = getattr(torch, args.dtype)
    subject = build(args.model, args.device, dtype, latent=args.latent)
    gen = torch.Generator().manual_seed(1234)
    z = torch.randn(args.batch, *subject.latent, generator=gen).to(subject.device)
    cond, uncond = subject.conditioning(args.batch, seed=99)
    if args.model == "lab":  # trained weights: the lab preset, whose efficacy bench/results/lab.json measured
        from memsafe.lab.evaluate import FD_RADIUS
        from memsafe.lab.runner import lab_config

        return subject, z, cond, uncond, lab_config("per_sample", fd_radius=FD_RADIUS)
    # Random weights: the target is set relative to the measured risk so that every image iterates (the lab
    # model gives the realistic iteration counts).
    sigma0 = float(subject.denoiser.get_sigmas(args.steps)[0])
    risk = memsafe.risk_score(z, guidance_from_denoiser(subject.denoiser, sigma0, cond, uncond))
    config = MitigationConfig(method="per_sample", scale_with_size=False, target=float(risk.min()) * args.target_ratio,
                              lr=args.lr, max_iterations=args.max_iterations, rho=args.rho,
                              fd_radius=args.fd_radius, uncond_steps=min(5, args.steps // 4))
    return subject, z, cond, uncond, config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_time(args: argparse.Namespace, methods: list[str]) -> dict[str, dict[str, Any]]:
    subject, z, cond, uncond, config = setup(args)
    generate(subject, "plain", z, cond, uncond, min(args.steps, 3), config)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    # On the CPU also the process's CPU time: the work done, without the time this process waited while other
    # processes had the cores (a shared machine's wall time swings with them; see cpu_time_ratio).
    cpu_times: dict[str, list[float]] = {m: [] for m in methods}
    info: dict[str, dict[str, Any]] = {}
    for rep in range(args.repeats):
        # interleaved, so load changes hit every method alike, and rotated, so that no method always runs first
        for m in methods[rep % len(methods):] + methods[: rep % len(methods)]:
            _sync(subject.device)
            if subject.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t, cpu = time.perf_counter(), time.process_time()
            out = generate(subject, m, z, cond, uncond, args.steps, config)
            _sync(subject.device)
            times[m].append(time.perf_counter() - t)
            cpu_times[m].append(time.process_time() - cpu)
            info[m] = {k: v for k, v in out.items() if k != "images"}
            if subject.device.type == "cuda":  # the allocator's peak, in process (the weights count in every row)
                info[m]["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
            cpu_note = f"  CPU {cpu_times[m][-1]:8.2f} s" if subject.device.type == "cpu" else ""
            print(f"  rep {rep + 1}/{args.repeats} {m:20s} {times[m][-1]:8.2f} s{cpu_note}", flush=True)
    for m in methods:
        info[m]["seconds"] = statistics.median(times[m])
        info[m]["seconds_all"] = times[m]
        # the ratio within each repeat (same sweep, same load), then the median over repeats
        info[m]["time_ratios"] = _ratios(times[m], times["plain"])
        info[m]["time_ratio"] = statistics.median(info[m]["time_ratios"])
        if subject.device.type == "cpu":  # on a GPU the host's CPU time is launch and wait, not the work
            info[m]["cpu_time_ratios"] = _ratios(cpu_times[m], cpu_times["plain"])
            info[m]["cpu_time_ratio"] = statistics.median(info[m]["cpu_time_ratios"])
    return info


def _ratios(times: list[float], plain: list[float]) -> list[float]:
    """Each repeat's time against plain's of the same repeat."""
    return [t / p for t, p in zip(times, plain, strict=True)]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: peak memory of one generation with ``args.child`` (with ``--child-allocated`` on the
    CPU: the peak of live tensor bytes instead of the peak RSS)."""
    subject, z, cond, uncond, config = setup(args)
    if subject.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        generate(subject, args.child, z, cond, uncond, args.steps, config)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    elif args.child_allocated:
        alive = _tensor_bytes([*subject.denoiser.parameters(), *subject.denoiser.buffers(), z,
                               *memsafe.guidance.tensors_in(cond), *memsafe.guidance.tensors_in(uncond)])
        peak = alive + _allocated_peak_cpu(lambda: generate(subject, args.child, z, cond, uncond, args.steps, config))
    else:
        # The peak RSS of the generation itself: reset the kernel's high-water mark after the model is built
        # (building it peaks higher than any run), then read it back (Linux >= 4.0; else the process peak).
        reset = _reset_peak_rss()
        generate(subject, args.child, z, cond, uncond, args.steps, config)
        peak = _peak_rss_bytes() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak, "rss_now": _rss_bytes()}))


def _tensor_bytes(tensors: list[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _allocated_peak_cpu(run: Callable[[], object]) -> int:
    """The highest bytes of CPU tensors allocated during ``run()`` above what was alive when it started: the
    running sum of the profiler's allocation records (+ allocated, - freed). With the bytes alive before, the CPU
    counterpart of ``torch.cuda.max_memory_allocated``: what the tensors need, without the allocator's slack
    that the RSS also counts (glibc keeps freed blocks of the heap mapped)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    cpu = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() in cpu)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def measure_memory(args: argparse.Namespace, methods: list[str], allocated: bool = False) -> dict[str, int]:
    """Peak memory of each method, each in a fresh process: the RSS on the CPU, or with ``allocated`` the live
    tensor bytes (CUDA: max allocated either way)."""
    peaks = {}
    for m in methods:
        cmd = [sys.executable, "-m", "bench", "perf", "--child", m, *(["--child-allocated"] if allocated else []),
               *[a for a in args.argv if a not in ("--no-memory", "--memory-only")]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
        peaks[m] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
        what = "allocated" if allocated else "memory"
        print(f"  {what} {m:20s} {peaks[m] / 2**20:10.1f} MiB", flush=True)
    return peaks


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def update_memory(args: argparse.Namespace, peaks: dict[str, int], command: str,
                  allocated: dict[str, int] | None = None) -> None:
    """Put newly measured memory ratios into the existing rows of the same model and device (the timed run's
    command stays; ``peak_memory_command`` says how memory was measured)."""
    path = args.out / "perf.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    model = _model_label(args)
    for method, peak in peaks.items():
        row = next((r for r in rows if _row_key(r) == (model, args.device, method, args.batch)), None)
        if row is None:  # no timed run at this size (too slow here): a memory-only row
            row = {"model": model, "device": args.device, "method": method, "dtype": args.dtype,
                   "batch": args.batch, "time_ratio": float("nan"), "evaluations_per_image": float("nan"),
                   "machine": machine(), "command": command}
            rows.append(row)
        row["peak_memory_ratio"] = peak / peaks["plain"]
        row["peak_memory_bytes"] = peak
        row["peak_memory_command"] = command
        if allocated:
            row["peak_allocated_ratio"] = allocated[method] / allocated["plain"]
            row["peak_allocated_bytes"] = allocated[method]
    write_rows(rows, args.out)


LAB_MAIN = {"plain": "no mitigation", "batch_wise": "batch-wise"}  # bench name: lab.json "main" label


def lab_efficacy_row(method: str) -> tuple[str, str] | None:
    """The lab.json row (section, label) that measured the efficacy of bench ``method`` on the same seeds, prompts
    and target, or None. A per_sample* name reads the lab variant of its step and gradient: checkpointing, a
    budget and one image per call change no numbers (tests/test_checkpointing.py, tests/test_methods.py)."""
    if method in LAB_MAIN:
        return "main", LAB_MAIN[method]
    if method == "per_sample_exact":
        return "variants", method
    parts = PER_SAMPLE_VARIANT.fullmatch(method)
    return None if parts is None else ("variants", "per_sample" + (parts["fd"] or "") + (parts["polyak"] or ""))


def attach_lab_efficacy(rows: list[dict[str, Any]]) -> None:
    """Add replication rate, alignment and diversity on the lab's CFG-driven prompts (from
    bench/results/lab.json, written by ``python -m memsafe.lab.evaluate``) to the lab model's rows."""
    path = RESULTS / "lab.json"
    if not path.exists():
        return
    lab = json.loads(path.read_text())
    for row in rows:
        where = lab_efficacy_row(row["method"]) if row["model"] == "lab" else None
        if where is None:
            continue
        section, label = where
        for r in lab.get(section, []):
            if r["method"] == label and r["regime"] == "cfg_driven":
                row.update(replication_rate=r["replication"], replication_ci95=r["replication_ci95"],
                           alignment=r["alignment"], alignment_ci95=r["alignment_ci95"],
                           diversity=r["diversity"], lab_iterations_mean=r["iterations_mean"],
                           efficacy_source=f"bench/results/lab.json ({lab.get('command', '')}), "
                                           f"{r['images']} images, DDIM 50 steps, CFG 7")


def _row_key(row: dict[str, Any]) -> tuple[str, str, str, int]:
    """What a row measures: a new row replaces the one with the same model, device, method and batch."""
    return row["model"], row["device"], row["method"], row["batch"]


def _method_rank(method: str) -> tuple[int, str]:
    """Where a method's row goes within its (model, device, batch) group: the order of :data:`METHODS`, then any
    other per-sample variant by name (budgets by size: 500 before 1000), then the rest by name."""
    if method in METHODS:
        return METHODS.index(method), ""
    name = re.sub(r"\d+", lambda digits: digits.group().zfill(9), method)
    return (len(METHODS), name) if PER_SAMPLE_VARIANT.fullmatch(method) else (len(METHODS) + 1, name)


def _model_rank(model: str) -> tuple[str, int]:
    """Models by name, a reduced latent size (``sd15@8``) before the native one, smaller sizes first."""
    name, _, side = model.partition("@")
    return name, int(side) if side.isdigit() else 1 << 30


def _row_order(row: dict[str, Any]) -> tuple[Any, ...]:
    """Rows of one model, device and batch together, plain first: a table that reads group by group however
    the rows arrived (timed runs, memory-only runs, imported GPU rows)."""
    return row["device"], _model_rank(row["model"]), row["batch"], _method_rank(row["method"])


def write_rows(rows: list[dict[str, Any]], out: Path = RESULTS) -> None:
    """Merge ``rows`` into ``out``/perf.json (a new row replaces the one of the same model, device, method and
    batch), keep them in :func:`_row_order`, and rewrite ``out``/perf.md from all rows."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "perf.json"
    existing = json.loads(path.read_text()) if path.exists() else []
    keys = {_row_key(r) for r in rows}
    merged = sorted([r for r in existing if _row_key(r) not in keys] + rows, key=_row_order)
    attach_lab_efficacy(merged)
    path.write_text(json.dumps(merged, indent=1) + "\n")
    lines = ["# Cost of the methods against plain generation", "",
             "Written by `python -m bench perf` (see bench/perf.py); ratios are measured side by side in one run.",
             "Peak memory: the RSS on a CPU, CUDA's max allocated on a GPU; peak allocated: the live tensor bytes "
             "(on a CPU from the profiler's allocation records, without the allocator's slack that the RSS counts).",
             "Time ratio: the median over repeats of each repeat's time against plain's in the same sweep; the "
             "range: the smallest and largest of those ratios (how much this machine's speed moved).",
             "CPU-time ratio (CPU rows recorded since it was measured): the same median and range, of the process's "
             "CPU time instead of the wall time: the work done without the time spent waiting while other "
             "processes had the cores (with --threads 1; with more threads their spin-waits count too).",
             "UNet calls (rows recorded since they were counted): whole-UNet calls of one generation without "
             "autograd / under autograd / backward passes; where the weights set a call's cost, a call with one "
             "image costs about what one with all does, so these predict the time better than the per-image "
             "evaluations once images stop after different numbers of iterations.",
             "", "| model | device | batch | method | time ratio | range over repeats | peak memory ratio | "
             "peak allocated ratio | evaluations / image | UNet calls | replication | alignment | CPU-time ratio (range) | "
             "command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in merged:
        lines.append(f"| {r['model']} | {r['device']} | {r['batch']} | {r['method']} | {r['time_ratio']:.3f} | "
                     f"{_range(r.get('time_ratios'))} | "
                     f"{r['peak_memory_ratio']:.3f} | {_fmt(r.get('peak_allocated_ratio'))} | "
                     f"{r['evaluations_per_image']:.1f} | {_unet_calls(r)} | "
                     f"{_fmt(r.get('replication_rate'))} | {_fmt(r.get('alignment'))} | {_cpu_time(r)} | "
                     f"`{_shown_command(r)}` |")
    (out / "perf.md").write_text("\n".join(lines) + "\n")


def _unet_calls(row: dict[str, Any]) -> str:
    """'no-grad / autograd / backward' whole-UNet calls, blank for rows measured before they were counted."""
    keys = ("unet_calls", "unet_grad_calls", "unet_backward_calls")
    return " / ".join(str(row[k]) for k in keys) if all(k in row for k in keys) else ""


def _shown_command(row: dict[str, Any]) -> str:
    """The command behind the row's numbers: the memory measurement's where no time was measured."""
    untimed = isinstance(row["time_ratio"], float) and math.isnan(row["time_ratio"])
    return row.get("peak_memory_command", row["command"]) if untimed else row["command"]


def _model_label(args: argparse.Namespace) -> str:
    """The row's model name: the model, with the latent side when it is not the native one (sd15@8)."""
    native = CONFIGS[args.model][0]["sample_size"] if args.model in CONFIGS else None
    return args.model if args.latent in (None, native) else f"{args.model}@{args.latent}"


def _command(argv: list[str] | None) -> str:
    """The command line that reproduces this run, as recorded in the rows: without ``--out``, which only says
    where the rows went (a scratch folder, before ``--import-rows`` merged them into bench/results)."""
    args = list(sys.argv[2:] if argv is None else argv)
    kept = []
    while args:
        arg = args.pop(0)
        if arg == "--out":
            args = args[1:]
        elif not arg.startswith("--out="):
            kept.append(arg)
    return "python -m bench perf " + " ".join(kept)


def _cpu_time(row: dict[str, Any]) -> str:
    """'median (range)' of the CPU-time ratios, blank where they were not measured (GPU rows, older rows)."""
    ratios = row.get("cpu_time_ratios")
    return f"{row['cpu_time_ratio']:.3f} ({_range(ratios)})" if ratios else ""


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.3f}"


def _range(ratios: list[float] | None) -> str:
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else ""


def add_per_sample_arguments(p: argparse.ArgumentParser) -> None:
    """The per-sample settings that ``bench perf`` and ``bench adjust`` share (:func:`setup` reads them)."""
    p.add_argument("--target-ratio", type=float, default=0.8, help="per-sample target as a fraction of min risk")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--rho", type=float, default=5.0)
    p.add_argument("--fd-radius", type=float, default=0.5)
    p.add_argument("--max-iterations", type=positive, default=50)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (exits with a message naming the option on a bad value); ``method_list``:
    plain first, then the methods asked for."""
    p = argparse.ArgumentParser(prog="python -m bench perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(p)
    p.add_argument("--steps", type=positive, default=50)
    p.add_argument("--batch", type=positive, default=2)
    p.add_argument("--repeats", type=positive, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    add_per_sample_arguments(p)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="only (re)measure memory of existing rows")
    p.add_argument("--refresh", action="store_true",
                   help="only rewrite perf.md (and the lab rows' efficacy from lab.json) from perf.json")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of perf.json/perf.md (default bench/results)")
    p.add_argument("--import-rows", type=Path, default=None, metavar="PERF_JSON",
                   help="only merge the rows of another perf.json (e.g. a GPU run's) into --out")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-allocated", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--allocated", action="store_true",
                   help="CPU: also measure the peak of live tensor bytes (profiler; one more run per method)")
    args = p.parse_args(argv)
    args.argv = sys.argv[2:] if argv is None else list(argv)  # the child processes measuring memory get the same
    args.method_list = ["plain", *[m for m in args.methods.split(",") if m != "plain"]]
    unknown = [m for m in args.method_list if m not in METHODS and PER_SAMPLE_VARIANT.fullmatch(m) is None]
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)} or a per_sample "
                f"variant {PER_SAMPLE_FORMS}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args)
    if args.child:
        measure_memory_child(args)
        return
    methods = args.method_list
    print(f"bench perf: {args.model} on {args.device} ({machine()}), {args.steps} steps, batch {args.batch}",
          flush=True)
    if args.refresh:  # rewrite perf.md and the lab rows' efficacy from the rows already in perf.json
        write_rows([], args.out)
        return
    if args.import_rows:
        write_rows(json.loads(args.import_rows.read_text()), args.out)
        return
    if args.memory_only:  # fill in the memory ratios of the rows a timed run of the same model wrote
        peaks = measure_memory(args, methods)
        allocated = measure_memory(args, methods, allocated=True) if args.allocated else None
        update_memory(args, peaks, _command(argv), allocated)
        return
    info = measure_time(args, methods)
    if args.device.startswith("cuda"):
        peaks = {m: info[m].pop("cuda_peak_bytes") for m in methods}
        allocated = peaks  # max allocated is what CUDA measures
    else:
        peaks = {} if args.no_memory else measure_memory(args, methods)
        allocated = measure_memory(args, methods, allocated=True) if args.allocated and not args.no_memory else {}
    command = _command(argv)
    rows = []
    for m in methods:
        row = {"model": _model_label(args),
               "device": args.device, "method": m, "dtype": args.dtype, "steps": args.steps, "batch": args.batch,
               "time_ratio_of_medians": info[m]["seconds"] / info["plain"]["seconds"],
               "peak_memory_ratio": (peaks[m] / peaks["plain"]) if peaks else float("nan"),
               "peak_memory_bytes": peaks.get(m),
               **({"peak_allocated_ratio": allocated[m] / allocated["plain"]} if allocated else {}),
               **{k: v for k, v in info[m].items() if k != "seconds_all"},
               "machine": machine(), "command": command}
        rows.append(row)
        cpu = f"  CPU time x{row['cpu_time_ratio']:.3f}" if "cpu_time_ratio" in row else ""
        print(f"{m:20s} time x{row['time_ratio']:.3f}{cpu}  memory x{row['peak_memory_ratio']:.3f}  "
              f"evaluations/image {row['evaluations_per_image']:.1f}")
    if not peaks:
        _keep_memory(rows, args.out)
    write_rows(rows, args.out)


MEMORY_FIELDS = ("peak_memory_ratio", "peak_memory_bytes", "peak_memory_command", "peak_allocated_ratio",
                 "peak_allocated_bytes")


def _keep_memory(rows: list[dict[str, Any]], out: Path) -> None:
    """A timed run without memory measurement keeps the memory that earlier runs measured for the same rows."""
    path = out / "perf.json"
    earlier = {_row_key(r): r for r in json.loads(path.read_text())} if path.exists() else {}
    for row in rows:
        before = earlier.get(_row_key(row), {})
        row.update({k: before[k] for k in MEMORY_FIELDS if k in before})

