"""A small attribute classifier (colour and shape) trained on generic data only, used to measure prompt alignment
of generated images that do not copy a training image (the lab's stand-in for a CLIP score)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import COLOUR_NAMES, SHAPES, render, sample_params, smooth_background, striped_background
from .model import WEIGHTS_DIR

CLASSIFIER_FILE = WEIGHTS_DIR / "lab_classifier.safetensors"


class AttributeClassifier(nn.Module):
    """Images ``[B, 3, 16, 16]`` in [-1, 1] -> (colour logits ``[B, 6]``, shape logits ``[B, 4]``)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.SiLU(),
        )
        self.colour = nn.Linear(2 * width, len(COLOUR_NAMES))
        self.shape = nn.Linear(2 * width, len(SHAPES))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x).amax(dim=(2, 3))
        return self.colour(h), self.shape(h)


def train_classifier(
    steps: int = 1500, batch: int = 128, seed: int = 1, lr: float = 2e-3
) -> AttributeClassifier:
    """Train on fresh images of the data distribution (a different seed from the diffusion training set: half on
    generic low-contrast stripes, a quarter on high-contrast stripes like the duplicated images, a quarter on
    untextured backgrounds), with pixel noise and slight blur as augmentation, so that imperfect generated images
    are judged by their shape and colour."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = AttributeClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for _ in range(steps):
        colour = torch.randint(len(COLOUR_NAMES), (batch,), generator=gen)
        shape = torch.randint(len(SHAPES), (batch,), generator=gen)
        x = render(sample_params(shape, colour, gen), _backgrounds(batch, gen))
        blur = torch.rand(batch, 1, 1, 1, generator=gen) < 0.3
        x = torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1), x)
        x = x + 0.1 * torch.rand(batch, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
        lc, ls = net(x)
        loss = F.cross_entropy(lc, colour) + F.cross_entropy(ls, shape)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


def _backgrounds(n: int, gen: torch.Generator) -> Tensor:
    kind = torch.rand(n, 1, 1, 1, generator=gen)
    low, high, smooth = (
        striped_background(n, gen),
        striped_background(n, gen, "high"),
        smooth_background(n, gen),
    )
    return torch.where(kind < 0.5, low, torch.where(kind < 0.75, high, smooth))


def classifier_accuracy(
    net: AttributeClassifier, n: int = 2048, seed: int = 2, contrast: str = "low"
) -> tuple[float, float]:
    """(colour accuracy, shape accuracy) on ``n`` fresh images with ``contrast`` stripes ("low": generic)."""
    gen = torch.Generator().manual_seed(seed)
    colour = torch.randint(len(COLOUR_NAMES), (n,), generator=gen)
    shape = torch.randint(len(SHAPES), (n,), generator=gen)
    params = sample_params(shape, colour, gen)
    with torch.no_grad():
        lc, ls = net(render(params, striped_background(n, gen, contrast)))
    return float((lc.argmax(1) == colour).float().mean()), float((ls.argmax(1) == shape).float().mean())


def save_classifier(net: AttributeClassifier, path: str | Path = CLASSIFIER_FILE) -> None:
    """Write the classifier's weights (safetensors)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def load_classifier(path: str | Path | None = None) -> AttributeClassifier:
    """The committed classifier (or ``path``), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else CLASSIFIER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"memsafe lab: no classifier at {path}; run `python -m memsafe.lab.train`")
    net = AttributeClassifier()
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False)
