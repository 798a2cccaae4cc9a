"""Benchmark: the non-UNet math of one optimizer iteration, fused (csrc/) vs the PyTorch reference, side by side.

Two chains, exactly the calls memsafe/methods.py makes per iteration, with the UNet outputs given:
- per-sample (Alg. 2): guidance difference + per-image norm + backward seed, stop test, masked AdamW step;
- batch-wise (Alg. 1): difference + norm + probe, difference + norm at the probe, batch-wise update.
Latents SD1 (4x64x64) and SDXL (4x128x128), batch 1, 4, 8, model outputs in fp16 and fp32 (z and the AdamW state
are float32, as in memsafe), on the CPU and on CUDA when available.

Measurements are interleaved (reference block, fused block, then the other order, several rounds; medians), so
both see the same machine state. Next to them: the floor, bytes the chain must move (inputs read once, outputs
written once) over the memory bandwidth measured here with a large torch copy. With ``--unet``, the time of a real
UNet forward pass of the same size (diffusers UNet2DConditionModel from SD1.5's published config, random weights,
the CFG batch of 2B images) shows the non-UNet share of an iteration. That share is an upper bound: per-sample also
runs a backward pass, and SDXL's own UNet is about 3x larger than SD1.5's.

Not a test: it prints ratios measured in one run and writes <out>/<name>.md and .json (default bench/results/ops).

    python bench/bench_ops.py [--device cpu|cuda|all] [--unet] [--quick] [--out DIR] [--name NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.models import count, positive, set_threads  # noqa: E402
from memsafe import ops  # noqa: E402

SHAPES = {"SD1": (4, 64, 64), "SDXL": (4, 128, 128)}
BATCHES = (1, 4, 8)
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
TARGET, GAMMA, RHO, LR, WD = 0.9, 0.7, 50.0, 0.01, 0.01
NEVER = 2**62  # max_iterations that keeps every image active however often the chain runs

# diffusers' unet/config.json of runwayml/stable-diffusion-v1-5 (the fields that shape the network)
SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


# -- the chains ----------------------------------------------------------------------------------------------------
class Iteration:
    """The tensors of one iteration (random stand-ins for the UNet outputs) and both implementations."""

    def __init__(self, device: str, batch: int, shape: tuple[int, int, int], dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(0)

        def rand(dt: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.randn(batch, *shape, generator=gen).to(device=device, dtype=dt)

        self.cond, self.uncond, self.cond_probe, self.uncond_probe = (rand(dtype) for _ in range(4))
        self.z, self.grad = rand(), rand() * 1e-3
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(self.z), torch.zeros_like(self.z)
        self.step = torch.zeros(batch, dtype=torch.long, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)

    def per_sample_reference(self) -> None:
        d = ops.guidance_diff_norm_ref(self.cond, self.uncond, active=self.active)
        keep = ops.stop_test_ref(d.norms, self.step, self.active, TARGET, NEVER)
        ops.adamw_step_ref(
            self.z, self.grad, self.exp_avg, self.exp_avg_sq, self.step, keep, lr=LR, weight_decay=WD
        )

    def per_sample_fused(self) -> None:
        d = ops.guidance_diff_norm(self.cond, self.uncond, active=self.active)
        keep = ops.stop_test(d.norms, self.step, self.active, TARGET, NEVER)
        ops.adamw_step_(
            self.z, self.grad, self.exp_avg, self.exp_avg_sq, self.step, keep, lr=LR, weight_decay=WD
        )

    def batch_wise_reference(self) -> None:
        d = ops.guidance_diff_norm_ref(self.cond, self.uncond, rho=RHO)
        probed = ops.guidance_diff_norm_ref(self.cond_probe, self.uncond_probe)
        ops.batchwise_update_ref(self.z, probed.diff, d.diff, GAMMA)

    def batch_wise_fused(self) -> None:
        d = ops.guidance_diff_norm(self.cond, self.uncond, rho=RHO)
        probed = ops.guidance_diff_norm(self.cond_probe, self.uncond_probe)
        ops.batchwise_update_(self.z, probed.diff, d.diff, GAMMA)


def floor_bytes(chain: str, numel: int, elem: int, batch: int) -> tuple[int, int]:
    """(bytes the chain must move, bytes our fused kernels move). Must: every input read once, every output
    written once. Ours adds the second pass over the difference (probe/seed need the finished norm)."""
    if chain == "per_sample":
        # diff+norm+seed: read cond, uncond; write diff, seed (f32). AdamW: read z, grad, m, v; write z, m, v.
        must = numel * (3 * elem + 4) + numel * 28 + batch * (4 + 8 + 1 + 1 + 8)
        return must, must + numel * elem
    # diff+norm+probe, diff+norm (at the probe), z -= gamma * (d_probe - d)
    must = numel * (3 * elem + 4) + numel * 3 * elem + numel * (2 * elem + 8)
    return must, must + numel * elem


# -- timing ----------------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def block_time(fn: Callable[[], None], device: str, iters: int) -> float:
    """Seconds per call over ``iters`` back-to-back calls (one sync at each end, as a loop would run)."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def side_by_side(
    ref: Callable[[], None], fused: Callable[[], None], device: str, rounds: int
) -> tuple[float, float]:
    """Median seconds per call of each, measured in alternating blocks of about 20 ms."""
    for fn in (ref, fused, ref, fused):  # warm-up: allocator, caches, first-call loading
        fn()
    one = max(block_time(ref, device, 1), block_time(fused, device, 1), 1e-6)
    iters = max(1, min(2000, int(0.02 / one)))
    times: dict[str, list[float]] = {"ref": [], "fused": []}
    for r in range(rounds):
        order = (("ref", ref), ("fused", fused)) if r % 2 == 0 else (("fused", fused), ("ref", ref))
        for name, fn in order:
            times[name].append(block_time(fn, device, iters))
    return statistics.median(times["ref"]), statistics.median(times["fused"])


def bandwidth(device: str) -> float:
    """Bytes per second of a large device-local copy (read + write counted), the best of a few."""
    numel = (256 if device == "cuda" else 64) * 2**20 // 4  # 256 MiB on a GPU, 64 MiB on the CPU (> L3)
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


# -- UNet ------------------------------------------------------------------------------------------------------------
def unet_forward_seconds(device: str, dtype: torch.dtype, shape: tuple[int, int, int], batch: int) -> float:
    """Median seconds of one UNet forward on the CFG batch (2 x batch images: cond and uncond), SD1.5 config."""
    from diffusers import UNet2DConditionModel

    key = (device, dtype)
    if key not in _UNETS:
        _UNETS.clear()  # one model in memory at a time
        torch.manual_seed(0)
        _UNETS[key] = UNet2DConditionModel(**SD15_UNET_CONFIG).to(device=device, dtype=dtype).eval()
    unet = _UNETS[key]
    x = torch.randn(2 * batch, *shape, device=device, dtype=dtype)
    context = torch.randn(2 * batch, 77, 768, device=device, dtype=dtype)
    t = torch.full((2 * batch,), 999, device=device)
    runs = 3 if device == "cuda" else 1  # a CPU pass takes seconds; one is enough to see the share
    times = []
    with torch.inference_mode():
        if device == "cuda":
            unet(x, t, encoder_hidden_states=context)  # warm-up (cuDNN algorithm choice)
        for _ in range(runs):
            sync(device)
            t0 = time.perf_counter()
            unet(x, t, encoder_hidden_states=context)
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


_UNETS: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


# -- machine ---------------------------------------------------------------------------------------------------------
def machine() -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


# -- main ------------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, object]:
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            raise SystemExit("bench_ops: --device cuda but torch sees no CUDA device")
        devices.remove("cuda")
    backend = ops.backend_info(load=True)
    print(f"backend: {backend['backend']} ({backend['reason']})", flush=True)
    for device in devices:
        served = backend["cuda_tensors" if device == "cuda" else "cpu_tensors"]
        if served == "reference" and not args.allow_reference:
            raise SystemExit(f"bench_ops: no compiled backend for {device} tensors ({backend['reason']})")
    unet_devices = devices if args.unet_device == "all" else [d for d in devices if d == args.unet_device]
    batches = (1, 8) if args.quick else BATCHES
    rounds = 3 if args.quick else args.rounds
    result: dict[str, object] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "backend": backend,
        "bandwidth_GBps": {},
        "rows": [],
        "unet": [],
    }
    rows: list[dict[str, object]] = result["rows"]  # type: ignore[assignment]
    for device in devices:
        bw = bandwidth(device)
        result["bandwidth_GBps"][device] = round(bw / 1e9, 1)  # type: ignore[index]
        print(f"{device}: copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
        for label, shape in SHAPES.items():
            for batch in batches:
                for dname, dtype in DTYPES.items():
                    it = Iteration(device, batch, shape, dtype)
                    numel = batch * shape[0] * shape[1] * shape[2]
                    elem = torch.empty(0, dtype=dtype).element_size()
                    for chain in ("per_sample", "batch_wise"):
                        ref_s, fused_s = side_by_side(
                            getattr(it, f"{chain}_reference"), getattr(it, f"{chain}_fused"), device, rounds
                        )
                        must, moved = floor_bytes(chain, numel, elem, batch)
                        row = {
                            "device": device,
                            "latent": label,
                            "batch": batch,
                            "dtype": dname,
                            "chain": chain,
                            "reference_us": round(ref_s * 1e6, 1),
                            "fused_us": round(fused_s * 1e6, 1),
                            "speedup": round(ref_s / fused_s, 2),
                            "floor_us": round(must / bw * 1e6, 2),
                            "fused_bytes_floor_us": round(moved / bw * 1e6, 2),
                            "bytes": must,
                        }
                        rows.append(row)
                        print(
                            f"{device:4} {label:4} b{batch} {dname} {chain:10} ref {row['reference_us']:>9} us"
                            f"  fused {row['fused_us']:>8} us  x{row['speedup']:<6} floor {row['floor_us']} us",
                            flush=True,
                        )
                    del it
                    write(result, args)  # partial results survive a time limit
        if device in unet_devices:
            measure_unet(device, batches, rows, result, args)
        if device == "cuda":
            torch.cuda.empty_cache()
    write(result, args)
    return result


def measure_unet(device: str, batches, rows, result, args) -> None:
    """UNet forward per (latent, batch, dtype) on CUDA; on the CPU fp32 and batch 1 only, scaled by the batch."""
    unet_rows: list[dict[str, object]] = result["unet"]
    dtypes = DTYPES if device == "cuda" else {"fp32": torch.float32}
    for dname, dtype in dtypes.items():
        for label, shape in SHAPES.items():
            measured = batches if device == "cuda" else (1,)
            for batch in measured:
                seconds = unet_forward_seconds(device, dtype, shape, batch)
                for b in batches if device == "cpu" else (batch,):
                    entry = {
                        "device": device,
                        "latent": label,
                        "batch": b,
                        "dtype": dname,
                        "unet_forward_ms": round(seconds * b / batch * 1e3, 3),
                        "extrapolated": b != batch,
                    }
                    unet_rows.append(entry)
                    print(
                        f"{device:4} {label:4} b{b} {dname} UNet forward {entry['unet_forward_ms']} ms",
                        flush=True,
                    )
                write(result, args)
    _UNETS.clear()


def write(result: dict[str, object], args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))


def markdown(result: dict[str, object]) -> str:
    m = result["machine"]
    lines = [
        "# Fused ops vs the PyTorch reference: non-UNet math of one optimizer iteration",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']}, load average at start "
        f"{m['load_average']})"  # type: ignore[index]
        + (f", GPU {m['gpu']} (CUDA {m['cuda']})" if "gpu" in m else ", no GPU")  # type: ignore[operator]
        + f"; {m['platform']}; Python {m['python']}; torch {m['torch']}.",  # type: ignore[index]
        "",
        f"Backend: {result['backend']['backend']} ({result['backend']['reason']}).",  # type: ignore[index]
        "",
        "Copy bandwidth (large torch copy, read + write): "
        + ", ".join(f"{d} {bw} GB/s" for d, bw in result["bandwidth_GBps"].items())  # type: ignore[union-attr]
        + ".",
        "",
        "Per iteration, UNet outputs given. per_sample: diff + norm + seed, stop test, masked AdamW step. "
        "batch_wise: diff + norm + probe, diff + norm at the probe, update. Times are medians of interleaved "
        "blocks; speedup = reference / fused, measured side by side in this run. Floor = bytes the chain must "
        "move / copy bandwidth; 'fused floor' adds the second pass over the difference our kernels make.",
        "",
        "| device | latent | batch | dtype | chain | reference us | fused us | speedup | floor us | fused floor us |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:  # type: ignore[union-attr]
        lines.append(
            f"| {r['device']} | {r['latent']} | {r['batch']} | {r['dtype']} | {r['chain']} | {r['reference_us']} "
            f"| {r['fused_us']} | {r['speedup']} | {r['floor_us']} | {r['fused_bytes_floor_us']} |"
        )
    if result["unet"]:
        lines += [
            "",
            "## Against a real UNet pass",
            "",
            "UNet forward of the CFG batch (2 x batch images, SD1.5 config, random weights). Share = non-UNet math "
            "/ (non-UNet math + one UNet forward): an upper bound (per-sample also runs a backward pass; SDXL's "
            "UNet is larger than SD1.5's). CPU: fp32 UNet at batch 1, scaled linearly for larger batches.",
            "",
            "| device | latent | batch | UNet dtype | UNet forward ms | per_sample fused share % | per_sample reference "
            "share % | batch_wise fused share % |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for u in result["unet"]:  # type: ignore[union-attr]
            unet_us = u["unet_forward_ms"] * 1e3

            def cell(chain: str, impl: str, u=u, unet_us=unet_us) -> str:
                # the CUDA UNet runs in the ops' dtype; on the CPU the one fp32 UNet stands for both ops dtypes
                parts = [
                    f"{r['dtype']} {100 * r[f'{impl}_us'] / (r[f'{impl}_us'] + unet_us):.2g}"
                    for r in result["rows"]  # type: ignore[union-attr]
                    if (r["device"], r["latent"], r["batch"], r["chain"])
                    == (u["device"], u["latent"], u["batch"], chain)
                    and (u["device"] == "cpu" or r["dtype"] == u["dtype"])
                ]
                return ", ".join(parts) or "-"

            extra = " (scaled from batch 1)" if u["extrapolated"] else ""
            lines.append(
                f"| {u['device']} | {u['latent']} | {u['batch']} | {u['dtype']} | {u['unet_forward_ms']:.1f}{extra} | "
                f"{cell('per_sample', 'fused')} | {cell('per_sample', 'reference')} | "
                f"{cell('batch_wise', 'fused')} |"
            )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of this benchmark; a count below its minimum is refused with a message naming the option."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--unet", action="store_true", help="also time a real UNet forward of each size")
    parser.add_argument("--unet-device", choices=("cpu", "cuda", "all"), default="all")
    parser.add_argument("--rounds", type=positive, default=7, help="interleaved blocks per implementation")
    parser.add_argument("--threads", type=count, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8 only, 3 rounds")
    parser.add_argument("--allow-reference", action="store_true", help="run even without a compiled backend")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--name", default="ops", help="file stem of the results")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the .md of an earlier run's .json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        source = Path(args.render)
        source.with_suffix(".md").write_text(markdown(json.loads(source.read_text())))
        print(f"wrote {source.with_suffix('.md')}")
        return 0
    if not args.unet:
        args.unet_device = "none"
    set_threads(args)
    run(args)
    print(f"wrote {Path(args.out) / args.name}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
