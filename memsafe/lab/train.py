"""Train the lab model (and the attribute classifier) from scratch, deterministically.

    python -m memsafe.lab.train                       # the committed weights: see memsafe/lab/weights/record.json
    python -m memsafe.lab.train --steps 200 --out /tmp/lab   # a quick smoke run

Writes ``lab_model.safetensors``, ``lab_classifier.safetensors`` and ``record.json`` (command, seed, steps, time,
machine, losses) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .classifier import classifier_accuracy, save_classifier, train_classifier
from .data import DataSpec, build_dataset
from .model import EMA, TRAIN_STEPS, WEIGHTS_DIR, LabModel, ModelConfig, sd_alphas_cumprod


def machine() -> dict[str, Any]:
    """A description of the machine for the records (CPU model, cores, torch version)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def train_model(
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    uncond_prob: float = 0.15,
    ema_decay: float = 0.998,
    warmup: int = 100,
    config: ModelConfig | None = None,
    spec: DataSpec | None = None,
    log_every: int = 100,
    checkpoint_every: int = 0,
    checkpoint_dir: Path | None = None,
) -> tuple[LabModel, dict[str, Any]]:
    """Train a LabModel for ``steps`` steps on the lab data set; returns the EMA model and a record of the run.

    Deterministic for a given seed, thread count and machine: batches, timesteps, noise and caption dropout all
    come from one seeded generator."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.time()
    ds = build_dataset(spec)
    index = ds.sample_index()
    ids = ds.vocab.encode(ds.captions)
    empty = ds.vocab.encode([""])[0]
    model = LabModel(config or ModelConfig(), ds.vocab, ds.spec)
    model.train()
    ab = sd_alphas_cumprod().float()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = EMA(ema_decay)
    ema.update(model)
    losses: list[float] = []
    running = 0.0
    print(
        f"memsafe lab: training {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on "
        f"{len(ds)} examples ({len(ds.captions)} unique images), {steps} steps of {batch_size}",
        flush=True,
    )
    for step in range(steps):
        pick = index[torch.randint(index.numel(), (batch_size,), generator=gen)]
        x0 = ds.images[pick]
        tok = ids[pick].clone()
        drop = torch.rand(batch_size, generator=gen) < uncond_prob
        tok[drop] = empty
        t = torch.randint(TRAIN_STEPS, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = model(xt, t, encoder_hidden_states=model.encode_ids(tok))
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        running += float(loss.detach())
        if checkpoint_every and checkpoint_dir is not None and (step + 1) % checkpoint_every == 0:
            snapshot = LabModel(model.config, ds.vocab, ds.spec)
            snapshot.load_state_dict(ema.shadow)
            snapshot.save(checkpoint_dir / f"step{step + 1:05d}.safetensors", extra={"steps": step + 1})
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            losses.append(running / n)
            elapsed = time.time() - t0
            eta = elapsed / (step + 1) * (steps - step - 1)
            print(
                f"  step {step + 1:5d}/{steps}  loss {running / n:.4f}  {elapsed / 60:5.1f} min (eta {eta / 60:.1f})",
                flush=True,
            )
            running = 0.0
    model.load_state_dict(ema.shadow)
    model.eval().requires_grad_(False)
    record = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "uncond_prob": uncond_prob,
        "ema_decay": ema_decay,
        "warmup": warmup,
        "loss_every_100_steps": [round(v, 5) for v in losses],
        "train_seconds": round(time.time() - t0, 1),
        "process_cpu_seconds": round(time.process_time(), 1),
    }
    return model, record


def main(argv: list[str] | None = None) -> None:
    """Command line: train, save the weights and the record."""
    ap = argparse.ArgumentParser(prog="python -m memsafe.lab.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--classifier-steps", type=int, default=1500)
    ap.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    ap.add_argument("--checkpoint-every", type=int, default=0, help="also save EMA snapshots every N steps")
    ap.add_argument("--checkpoint-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    model, record = train_model(
        args.steps,
        args.batch_size,
        args.lr,
        args.seed,
        checkpoint_every=args.checkpoint_every,
        checkpoint_dir=args.checkpoint_dir,
    )
    t1 = time.time()
    net = train_classifier(steps=args.classifier_steps)
    acc_colour, acc_shape = classifier_accuracy(net)
    acc_high = classifier_accuracy(net, contrast="high")
    record.update(
        command="python -m memsafe.lab.train " + " ".join(sys.argv[1:] if argv is None else argv),
        started=started,
        machine=machine(),
        classifier={
            "steps": args.classifier_steps,
            "seconds": round(time.time() - t1, 1),
            "accuracy_colour": acc_colour,
            "accuracy_shape": acc_shape,
            "accuracy_on_high_contrast_stripes": list(acc_high),
        },
        model_config=model.config.__dict__,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / "lab_model.safetensors", extra=record)
    save_classifier(net, args.out / "lab_classifier.safetensors")
    (args.out / "record.json").write_text(json.dumps(record, indent=2, default=list) + "\n")
    print(f"memsafe lab: wrote {args.out}/lab_model.safetensors, lab_classifier.safetensors, record.json")
    print(f"  classifier accuracy on fresh generic images: colour {acc_colour:.3f}, shape {acc_shape:.3f}")


if __name__ == "__main__":
    main()
