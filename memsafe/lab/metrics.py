"""What the lab measures on generated images: copy similarity to the nearest training image (replication),
attribute agreement with the prompt (alignment), and mean pairwise distance per prompt (diversity).

Similarity is ``1 - RMSE / 2`` in pixel space ([-1, 1] images): 1 for identical images, 0 for opposite ones.
Why this one and the threshold are in ``bench/results/lab.md`` (measured distributions: fresh draws of the data
distribution against the training set, and generated images).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .classifier import AttributeClassifier


def similarity(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise similarity ``1 - RMSE(a_i, b_j) / 2``, ``[len(a), len(b)]``."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    d2 = (fa.pow(2).sum(1)[:, None] + fb.pow(2).sum(1)[None] - 2 * fa @ fb.T).clamp_min(0)
    return (1 - (d2 / fa.shape[1]).sqrt() / 2).float()


def nearest(images: Tensor, train: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """For every image, the similarity to its nearest training image and that image's index (``[N]`` each)."""
    best = torch.full((images.shape[0],), -float("inf"))
    index = torch.zeros(images.shape[0], dtype=torch.long)
    for start in range(0, train.shape[0], chunk):
        sim = similarity(images, train[start : start + chunk])
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
    dist = 2 * (1 - similarity(images, images))
    return float(dist.sum() / (n * (n - 1)))
