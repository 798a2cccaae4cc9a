"""The lab's synthetic text-image data: coloured shapes on striped backgrounds, with captions whose attributes
(colour and shape) can be checked in any output image. Every image has its own random texture (stripes of random
angle, period, phase and colours), so a new image never coincides with a training image by chance and a copy is
unmistakable; the duplicated images have high-contrast stripes, the others low-contrast ones.

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
    # cfg-driven: the copy is 1/3 of the caption's images (300 of 900), and the caption's varied images are 3/8 of
    # all varied images of that colour and shape (600 of 600 + 1000 generic): p(c|copy) / p(c|varied) = 8/3, so
    # CFG's p(c|x)^(w-1) favours the copy ~360-fold at w = 7, while at w = 1 it is 1/3 of p(x|c)
    return tuple(MemorizedCaption(n, c, s, "cfg_driven", 300, 600) for n, c, s in cfg_driven) + tuple(
        MemorizedCaption(n, c, s, "point_mass", 300, 0) for n, c, s in point_mass
    )


@dataclass(frozen=True)
class DataSpec:
    """Everything that determines the training set."""

    seed: int = 0
    generic_per_caption: int = 250
    generic_per_memorized_caption: int = 1000  # generic images of the attributes of a cfg-driven caption
    memorized: tuple[MemorizedCaption, ...] = field(default_factory=_default_memorized)

    def generic_count(self, caption: str) -> int:
        """How many generic images ``caption`` (``"<colour> <shape>"``) has."""
        cfg_driven = {f"{m.colour} {m.shape}" for m in self.memorized if m.regime == "cfg_driven"}
        return self.generic_per_memorized_caption if caption in cfg_driven else self.generic_per_caption

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DataSpec:
        mem = tuple(MemorizedCaption(**m) for m in values.get("memorized", ()))
        return cls(
            seed=int(values["seed"]),
            generic_per_caption=int(values["generic_per_caption"]),
            generic_per_memorized_caption=int(values["generic_per_memorized_caption"]),
            memorized=mem,
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


def sample_params(shape: Tensor, colour: Tensor, gen: torch.Generator) -> ImageParams:
    """Random position, size and colour jitter for images of the given shape and colour ids."""
    n = shape.numel()
    base = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])[colour]
    rgb = (base + 0.08 * (2 * torch.rand(n, 3, generator=gen) - 1)).clamp(-1, 1)
    radius = 3.5 + 2.0 * torch.rand(n, generator=gen)
    lo = radius + 0.5
    centre = lo[:, None] + (IMAGE_SIZE - 2 * lo)[:, None] * torch.rand(n, 2, generator=gen)
    return ImageParams(shape, colour, rgb, centre, radius)


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


def render(p: ImageParams, background: Tensor) -> Tensor:
    """Images ``[N, 3, IMAGE_SIZE, IMAGE_SIZE]`` in [-1, 1]: the shapes of ``p`` (anti-aliased by supersampling)
    over ``background`` (``[N, 3, IMAGE_SIZE, IMAGE_SIZE]``)."""
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
    return background * (1 - alpha) + p.rgb[:, :, None, None] * alpha


def striped_background(n: int, gen: torch.Generator, contrast: str = "low") -> Tensor:
    """``n`` backgrounds ``[n, 3, H, W]``: smooth stripes of random angle, period (3-7 px) and phase between a dark
    and a lighter greyish colour. ``contrast="low"`` (generic images): the light colour is 0.15-0.45 above the dark
    one; ``"high"`` (the duplicated images, like a striking poster): 0.5-1.3 above."""
    angle = torch.pi * torch.rand(n, 1, 1, generator=gen)
    period = 3.0 + 4.0 * torch.rand(n, 1, 1, generator=gen)
    phase = 2 * torch.pi * torch.rand(n, 1, 1, generator=gen)
    tint = 0.15 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    dark = -0.95 + 0.5 * torch.rand(n, 1, 1, 1, generator=gen) + tint
    if contrast == "low":
        step = 0.15 + 0.3 * torch.rand(n, 1, 1, 1, generator=gen)
    elif contrast == "high":
        step = 0.5 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen)
    else:
        raise ValueError(f"contrast must be 'low' or 'high', got {contrast!r}")
    light = dark + step + 0.2 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    wave = 0.5 + 0.5 * torch.sin(2 * torch.pi * (x * angle.cos() + y * angle.sin()) / period + phase)
    return (dark + (light - dark) * wave[:, None]).clamp(-1, 1)


def smooth_background(n: int, gen: torch.Generator) -> Tensor:
    """``n`` untextured backgrounds (a dark 2x2 colour field, bilinear): not in the data; the classifier sees
    them so that it judges generated images that lost their texture by their shape and colour."""
    grey = -0.95 + 0.6 * torch.rand(n, 1, 2, 2, generator=gen)
    tint = 0.12 * (2 * torch.rand(n, 3, 1, 1, generator=gen) - 1)
    return F.interpolate(grey + tint, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=True)


def random_images(shape: Tensor, colour: Tensor, gen: torch.Generator, contrast: str = "low") -> Tensor:
    """Fresh images of the given shape and colour ids on random striped backgrounds (``contrast="low"``: generic
    and varied images; ``"high"``: in the style of the duplicated images)."""
    return render(sample_params(shape, colour, gen), striped_background(shape.numel(), gen, contrast))


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
        n = spec.generic_count(caption)
        images.append(random_images(torch.full((n,), s), torch.full((n,), c), gen))
        captions += [caption] * n
        counts.append(torch.ones(n, dtype=torch.long))
        kinds += ["generic"] * n
    offset = sum(x.shape[0] for x in images)
    for m in spec.memorized:
        c, s = COLOUR_NAMES.index(m.colour), SHAPES.index(m.shape)
        copy = random_images(torch.tensor([s]), torch.tensor([c]), gen, contrast="high")
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
