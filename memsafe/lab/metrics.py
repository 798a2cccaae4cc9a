"""What the lab measures on generated images: copy similarity to the nearest training image (replication),
attribute agreement with the prompt (alignment), and mean pairwise distance per prompt (diversity).

Copy similarity is the Pearson correlation of the two images' high-pass parts (each image minus its 5x5 local
mean), per colour channel, averaged over the channels: 1 for identical images. It is invariant to per-channel
brightness and contrast (classifier-free guidance at scale 7 saturates the colours of a copy; a copy detector must
not miss it for that, as SSCD does not) and to smooth background shading, and it follows structure: edges and
textures, which a copy shares with its original and a new image of the same attributes does not. Why this one and
the threshold are in ``bench/results/lab.md`` (measured distributions of generated and fresh images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .classifier import AttributeClassifier

HIGH_PASS = 5  # size of the local mean removed before correlating


def high_pass(x: Tensor, size: int = HIGH_PASS) -> Tensor:
    """``x`` minus its ``size`` x ``size`` local mean (edges replicated), per channel."""
    c = x.shape[1]
    kernel = torch.full((c, 1, size, size), 1.0 / (size * size), dtype=x.dtype, device=x.device)
    return x - F.conv2d(F.pad(x, (size // 2,) * 4, mode="replicate"), kernel, groups=c)


def _features(x: Tensor) -> Tensor:
    """Per-channel centred and normalized high-pass pixels, scaled so that a dot product is the mean channel
    correlation."""
    f = high_pass(x.double()).flatten(2)
    f = f - f.mean(2, keepdim=True)
    f = f / f.norm(dim=2, keepdim=True).clamp_min(1e-6)
    return f.flatten(1) / math.sqrt(x.shape[1])


def similarity(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise copy similarity ``[len(a), len(b)]``: per-channel Pearson correlation of the high-pass images,
    averaged over channels."""
    return (_features(a) @ _features(b).T).float()


def rmse_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise ``1 - RMSE / 2`` (not invariant to brightness or contrast; reported for comparison)."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    d2 = (fa.pow(2).sum(1)[:, None] + fb.pow(2).sum(1)[None] - 2 * fa @ fb.T).clamp_min(0)
    return (1 - (d2 / fa.shape[1]).sqrt() / 2).float()


def nearest(images: Tensor, train: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """For every image, the similarity to its nearest training image and that image's index (``[N]`` each)."""
    fi = _features(images)
    best = torch.full((images.shape[0],), -float("inf"))
    index = torch.zeros(images.shape[0], dtype=torch.long)
    for start in range(0, train.shape[0], chunk):
        sim = (fi @ _features(train[start : start + chunk]).T).float()
        value, arg = sim.max(1)
        better = value > best
        best = torch.where(better, value, best)
        index = torch.where(better, arg + start, index)
    return best, index


@torch.no_grad()
def attribute_predictions(
    classifier: AttributeClassifier, images: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(colour id, shape id, colour probabilities, shape probabilities) predicted for every image."""
    lc, ls = classifier(images.clamp(-1, 1))
    return lc.argmax(1), ls.argmax(1), lc.softmax(1), ls.softmax(1)


def alignment(
    classifier: AttributeClassifier, images: Tensor, colour: Tensor, shape: Tensor
) -> tuple[Tensor, Tensor]:
    """Per image: whether both the colour and the shape named in the prompt are recognised (bool ``[N]``), and the
    classifier's probability of the prompt's attributes, ``p(colour) * p(shape)`` (a soft score, ``[N]``)."""
    pc, ps, prob_c, prob_s = attribute_predictions(classifier, images)
    hit = (pc == colour) & (ps == shape)
    soft = prob_c.gather(1, colour[:, None]).squeeze(1) * prob_s.gather(1, shape[:, None]).squeeze(1)
    return hit, soft


def pairwise_diversity(images: Tensor) -> float:
    """Mean pairwise RMSE between the images of one prompt (0 when all are identical; NaN for one image)."""
    n = images.shape[0]
    if n < 2:
        return float("nan")
    dist = 2 * (1 - rmse_similarity(images, images))
    return float(dist.sum() / (n * (n - 1)))
