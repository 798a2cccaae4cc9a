"""The lab's synthetic text-image data: coloured shapes on smooth backgrounds, with captions whose attributes
(colour and shape) can be checked in any output image.

The training set reproduces the situation in which LAION made Stable Diffusion memorize:

- **generic** captions ``"<colour> <shape>"``: many varied images, no duplicates;
- **cfg-driven** memorized captions ``"<colour> <shape> <name>"``: many varied images of that colour and shape
  *plus one specific image duplicated many times* (a heavy point mass inside a broad conditional distribution).
  At guidance 1 they replicate at a moderate rate; strong classifier-free guidance sharpens
  ``p(x|c)^w / p(x)^(w-1)`` towards the duplicated image. This is the regime the paper's methods target;
- **point-mass** memorized captions ``"<colour> <shape> <name>"``: one image duplicated many times and nothing
  else. No initial noise can escape a point mass; auto mode should at least detect them.

Everything is a pure function of the seed (a ``torch.Generator``): the evaluation rebuilds the exact training set
to search it for the nearest training image of every output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 16
SUPERSAMPLE = 4
CAPTION_LENGTH = 4  # <bos> colour shape name-or-pad

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, -0.75, -0.75),
    "green": (-0.75, 0.85, -0.75),
    "blue": (-0.6, -0.45, 0.95),
    "yellow": (0.9, 0.85, -0.75),
    "magenta": (0.9, -0.75, 0.9),
    "cyan": (-0.75, 0.85, 0.9),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)


@dataclass(frozen=True)
class MemorizedCaption:
    """A memorized caption: its attributes, its name token, and how its training images are made."""

    name: str
    colour: str
    shape: str
    regime: str  # "cfg_driven" or "point_mass"
    duplicates: int  # copies of the one specific image
    varied: int  # varied images of the same colour and shape (0 for point-mass captions)

    @property
    def caption(self) -> str:
        return f"{self.colour} {self.shape} {self.name}"


def _default_memorized() -> tuple[MemorizedCaption, ...]:
    cfg_driven = [
        ("mem0", "red", "circle"),
        ("mem1", "green", "square"),
        ("mem2", "blue", "triangle"),
        ("mem3", "yellow", "cross"),
        ("mem4", "magenta", "square"),
        ("mem5", "cyan", "circle"),
        ("mem6", "red", "triangle"),
        ("mem7", "blue", "cross"),
    ]
    point_mass = [
        ("solo0", "green", "circle"),
        ("solo1", "magenta", "triangle"),
        ("solo2", "cyan", "cross"),
        ("solo3", "yellow", "square"),
    ]
    # (duplicates, varied): the copy is 25% of the caption's images for mem0-3 and 14% for mem4-7
    sizes = [(150, 450)] * 4 + [(100, 600)] * 4
    return tuple(
        MemorizedCaption(n, c, s, "cfg_driven", d, v)
        for (n, c, s), (d, v) in zip(cfg_driven, sizes, strict=True)
    ) + tuple(MemorizedCaption(n, c, s, "point_mass", 150, 0) for n, c, s in point_mass)


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines the training set."""

    seed: int = 0
    generic_per_caption: int = 800
    memorized: tuple[MemorizedCaption, ...] = field(default_factory=_default_memorized)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DataSpec:
        mem = tuple(MemorizedCaption(**m) for m in values.get("memorized", ()))
        return cls(
            seed=int(values["seed"]), generic_per_caption=int(values["generic_per_caption"]), memorized=mem
        )


# -- vocabulary ------------------------------------------------------------------------------------------------
class Vocabulary:
    """Word <-> token id. Id 0 is padding, 1 the begin token; every caption is ``CAPTION_LENGTH`` ids long."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = tuple(names)  # the memorized captions' name tokens
        self.words: tuple[str, ...] = ("<pad>", "<bos>", *COLOUR_NAMES, *SHAPES, *names)
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, captions: list[str]) -> Tensor:
        """Token ids ``[len(captions), CAPTION_LENGTH]`` (int64). The empty caption is ``<bos>`` and padding.

        Raises ValueError naming an unknown word or a caption that is too long."""
        out = torch.zeros(len(captions), CAPTION_LENGTH, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = caption.split()
            if len(words) > CAPTION_LENGTH - 1:
                raise ValueError(f"lab caption {caption!r} has more than {CAPTION_LENGTH - 1} words")
            ids = [1]
            for w in words:
                if w not in self.index:
                    raise ValueError(
                        f"lab caption {caption!r}: unknown word {w!r}; known: {', '.join(self.words[2:])}"
                    )
                ids.append(self.index[w])
            out[row, : len(ids)] = torch.tensor(ids)
        return out


# -- rendering -------------------------------------------------------------------------------------------------
@dataclass
class ImageParams:
    """Per-image drawing parameters (one row per image)."""

    shape: Tensor  # [N] int64, index into SHAPES
    colour: Tensor  # [N] int64, index into COLOUR_NAMES
    rgb: Tensor  # [N, 3] jittered foreground colour in [-1, 1]
    centre: Tensor  # [N, 2] (x, y) in pixels
    radius: Tensor  # [N]
    background: Tensor  # [N, 3, 2, 2] corner colours of the smooth background


def sample_params(shape: Tensor, colour: Tensor, gen: torch.Generator) -> ImageParams:
    """Random position, size, colour jitter and background for images of the given shape and colour ids."""
    n = shape.numel()
    base = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])[colour]
    rgb = (base + 0.08 * (2 * torch.rand(n, 3, generator=gen) - 1)).clamp(-1, 1)
    radius = 3.5 + 2.0 * torch.rand(n, generator=gen)
    lo = radius + 0.5
    centre = lo[:, None] + (IMAGE_SIZE - 2 * lo)[:, None] * torch.rand(n, 2, generator=gen)
    grey = -0.95 + 0.6 * torch.rand(n, 1, 2, 2, generator=gen)
    tint = 0.12 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    return ImageParams(shape, colour, rgb, centre, radius, grey + tint)


def _shape_mask(shape: str, dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    """Inside-the-shape test at offsets (dx, dy) from the centre, for shapes of radius r."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r)
    if shape == "triangle":
        return (dy >= -r) & (dy <= 0.75 * r) & (dx.abs() <= (dy + r) / 1.75)
    arm = 0.35 * r  # cross
    return ((dx.abs() <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx.abs() <= r))


def render(p: ImageParams) -> Tensor:
    """Images ``[N, 3, IMAGE_SIZE, IMAGE_SIZE]`` in [-1, 1], anti-aliased by supersampling."""
    n = p.shape.numel()
    s = IMAGE_SIZE * SUPERSAMPLE
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx = x[None] - p.centre[:, 0, None, None]
    dy = y[None] - p.centre[:, 1, None, None]
    r = p.radius[:, None, None]
    mask = torch.zeros(n, s, s)
    for k in range(len(SHAPES)):
        rows = (p.shape == k).nonzero().flatten()
        if rows.numel():
            mask[rows] = _shape_mask(SHAPES[k], dx[rows], dy[rows], r[rows]).float()
    alpha = F.avg_pool2d(mask[:, None], SUPERSAMPLE)
    bg = F.interpolate(p.background, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=True)
    return bg * (1 - alpha) + p.rgb[:, :, None, None] * alpha


def random_images(shape: Tensor, colour: Tensor, gen: torch.Generator) -> Tensor:
    """Fresh varied images of the given shape and colour ids (for the classifier and the varied sets)."""
    return render(sample_params(shape, colour, gen))


# -- the training set ------------------------------------------------------------------------------------------
def generic_captions() -> list[str]:
    """Every generic caption, ``"<colour> <shape>"``, colours first."""
    return [f"{c} {s}" for c in COLOUR_NAMES for s in SHAPES]


def attributes(caption: str) -> tuple[int, int]:
    """(colour id, shape id) named in a caption."""
    words = caption.split()
    return COLOUR_NAMES.index(words[0]), SHAPES.index(words[1])


@dataclass
class LabDataset:
    """The training set: unique images, their captions, and how many times each appears (duplication)."""

    spec: DataSpec
    vocab: Vocabulary
    images: Tensor  # [U, 3, H, W] unique images
    captions: list[str]  # [U]
    counts: Tensor  # [U] int64, copies of each unique image in the training set
    kind: list[str]  # [U] "generic", "cfg_driven_varied", "cfg_driven_copy", "point_mass_copy"
    copy_index: dict[str, int]  # memorized caption -> index of its duplicated image

    def __len__(self) -> int:
        return int(self.counts.sum())

    def sample_index(self) -> Tensor:
        """Index into the unique images of every training example (duplicates repeated), in a fixed order."""
        return torch.repeat_interleave(torch.arange(len(self.captions)), self.counts)


def build_dataset(spec: DataSpec | None = None) -> LabDataset:
    """The training set of ``spec`` (deterministic: the same spec gives bit-identical images)."""
    spec = spec or DataSpec()
    gen = torch.Generator().manual_seed(spec.seed)
    vocab = Vocabulary(tuple(m.name for m in spec.memorized))
    images, captions, counts, kinds = [], [], [], []
    copy_index: dict[str, int] = {}
    for caption in generic_captions():
        c, s = attributes(caption)
        n = spec.generic_per_caption
        images.append(random_images(torch.full((n,), s), torch.full((n,), c), gen))
        captions += [caption] * n
        counts.append(torch.ones(n, dtype=torch.long))
        kinds += ["generic"] * n
    offset = sum(x.shape[0] for x in images)
    for m in spec.memorized:
        c, s = COLOUR_NAMES.index(m.colour), SHAPES.index(m.shape)
        copy = random_images(torch.tensor([s]), torch.tensor([c]), gen)
        images.append(copy)
        captions.append(m.caption)
        counts.append(torch.tensor([m.duplicates]))
        kinds.append(f"{m.regime}_copy")
        copy_index[m.caption] = offset
        offset += 1
        if m.varied:
            images.append(random_images(torch.full((m.varied,), s), torch.full((m.varied,), c), gen))
            captions += [m.caption] * m.varied
            counts.append(torch.ones(m.varied, dtype=torch.long))
            kinds += [f"{m.regime}_varied"] * m.varied
            offset += m.varied
    return LabDataset(spec, vocab, torch.cat(images), captions, torch.cat(counts), kinds, copy_index)
