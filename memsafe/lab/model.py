"""The lab's text-to-image model: a small text encoder of our own and a diffusers ``UNet2DConditionModel`` built
from a config, predicting the noise (eps) of RGB images in pixel space on Stable Diffusion's DDPM schedule.

Weights live in one safetensors file whose metadata carries the configs (no pickle anywhere).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import CAPTION_LENGTH, IMAGE_SIZE, DataSpec, Vocabulary

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_FILE = WEIGHTS_DIR / "lab_model.safetensors"


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of the text encoder and the UNet."""

    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)  # cross-attention at 4x4 (+ the mid block)
    text_time_embedding: bool = True  # pooled text added to the time embedding: conditions every resnet
    attention_head_dim: int = 8
    layers_per_block: int = 1
    norm_num_groups: int = 8

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        v = dict(values)
        v["block_out_channels"] = tuple(v["block_out_channels"])
        v["attention_levels"] = tuple(bool(a) for a in v["attention_levels"])
        return cls(**v)


class TextEncoder(nn.Module):
    """Token embeddings + learned positions + a small pre-norm transformer: ids ``[B, L]`` -> ``[B, L, D]``."""

    def __init__(
        self, vocab_size: int, dim: int, layers: int, heads: int, length: int = CAPTION_LENGTH
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Parameter(torch.zeros(length, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.tokens.weight, std=0.3)
        nn.init.normal_(self.positions, std=0.1)

    def forward(self, ids: Tensor) -> Tensor:
        return self.norm(self.transformer(self.tokens(ids) + self.positions))


def build_unet(config: ModelConfig) -> nn.Module:
    """A diffusers UNet2DConditionModel for 3-channel ``IMAGE_SIZE`` images, cross-attending to the text."""
    from diffusers import UNet2DConditionModel

    down = [("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in config.attention_levels]
    up = [("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(config.attention_levels)]
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        layers_per_block=config.layers_per_block,
        block_out_channels=config.block_out_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        cross_attention_dim=config.text_dim,
        attention_head_dim=config.attention_head_dim,
        norm_num_groups=config.norm_num_groups,
        addition_embed_type="text" if config.text_time_embedding else None,
        addition_embed_type_num_heads=config.text_heads,
    )


class LabModel(nn.Module):
    """Text encoder + UNet. ``model(x, t, encoder_hidden_states=emb)`` returns eps, the calling convention of
    :func:`memsafe.guidance_from_eps_model`; :meth:`encode` turns captions into ``emb`` (``""`` is unconditional)."""

    def __init__(self, config: ModelConfig, vocab: Vocabulary, data_spec: DataSpec | None = None) -> None:
        super().__init__()
        self.config = config
        self.vocab = vocab
        self.data_spec = data_spec or DataSpec()
        self.text_encoder = TextEncoder(len(vocab), config.text_dim, config.text_layers, config.text_heads)
        self.unet = build_unet(config)

    def encode_ids(self, ids: Tensor) -> Tensor:
        """Hidden states ``[B, L, D]`` for token ids ``[B, L]``."""
        return self.text_encoder(ids)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> Tensor:
        """Hidden states ``[B, L, D]`` for captions (no gradient; ``""`` gives the unconditional embedding)."""
        device = next(self.parameters()).device
        return self.text_encoder(self.vocab.encode(captions).to(device))

    def forward(self, x: Tensor, t: Tensor | float, encoder_hidden_states: Tensor) -> Tensor:
        if not isinstance(t, Tensor):
            t = torch.full((x.shape[0],), float(t), device=x.device)
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states).sample

    # -- weights --------------------------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> None:
        """Write all weights (float32) and the configs to a safetensors file."""
        from safetensors.torch import save_file

        meta = {
            "model_config": json.dumps(asdict(self.config)),
            "vocab": json.dumps(list(self.vocab.names)),
            "data_spec": json.dumps(self.data_spec.to_dict()),
            "extra": json.dumps(extra or {}),
        }
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)


def load_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> LabModel:
    """The lab model from a safetensors file written by :meth:`LabModel.save` (default: the committed weights),
    in eval mode. Raises FileNotFoundError with a hint if the file is missing."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"memsafe lab: no weights at {path}; train them with `python -m memsafe.lab.train`"
        )
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    config = ModelConfig.from_dict(json.loads(meta["model_config"]))
    names = tuple(json.loads(meta["vocab"]))
    spec = DataSpec.from_dict(json.loads(meta["data_spec"]))
    model = LabModel(config, Vocabulary(names), spec)
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval().requires_grad_(False)


def weights_metadata(path: str | Path | None = None) -> dict[str, Any]:
    """The ``extra`` record stored with the weights (training command, steps, time...)."""
    from safetensors import safe_open

    with safe_open(str(path or MODEL_FILE), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("extra", "{}"))


# -- the noise schedule (Stable Diffusion's) ------------------------------------------------------------------
TRAIN_STEPS = 1000


def sd_alphas_cumprod(steps: int = TRAIN_STEPS) -> Tensor:
    """SD1/SD2's DDPM schedule: scaled-linear betas 0.00085..0.012 over 1000 steps, cumulative alphas (float64).
    Its first k-diffusion sigma, ``sqrt((1 - a) / a)`` at t = 999, is 14.61 as in SD."""
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0)


@dataclass
class EMA:
    """Exponential moving average of a module's parameters and buffers."""

    decay: float
    shadow: dict[str, Tensor] = field(default_factory=dict)
    updates: int = 0

    def update(self, module: nn.Module) -> None:
        """Fold the module's current weights in, with decay ``min(decay, (1 + n) / (10 + n))`` after ``n``
        updates (the usual warm-up, so a short run is not dominated by its random initialization)."""
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        with torch.no_grad():
            for k, v in module.state_dict().items():
                if k not in self.shadow:
                    self.shadow[k] = v.detach().clone()
                elif v.dtype.is_floating_point:
                    self.shadow[k].lerp_(v.detach(), 1 - decay)
                else:
                    self.shadow[k].copy_(v)
