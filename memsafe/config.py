"""MitigationConfig: every parameter of the paper's two methods and of auto mode, with validation and presets.

All parameters live in the unit-variance space of the initial latent ``z`` (see DESIGN.md). ``rho``, ``target``
and ``risk_threshold`` are L2 norms over a whole latent: they are given for the reference size of SD1 at 512 px
(4x64x64 = 16384 elements) and, with ``scale_with_size``, scaled by ``sqrt(numel / 16384)`` for other sizes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

METHODS = ("off", "batch_wise", "per_sample", "auto")
AUTO_METHODS = ("batch_wise", "per_sample")
GRADIENTS = ("autograd", "finite_difference")
OPTIMIZERS = ("adamw", "polyak")
REFERENCE_NUMEL = 4 * 64 * 64  # SD1 latent at 512 px, where the paper's numbers were measured
SD_SIGMA_MAX = 14.614642  # first k-diffusion sigma of SD1/SD2's 1000-step scaled-linear schedule


@dataclass(frozen=True)
class _Field:
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    doc: str = ""

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        bracket = "(" if self.low_open else "["
        noun = "an integer" if self.kind is int else "a number"
        return f"{noun} in {bracket}{self.low:g}, {self.high:g}]"


# The public field names are used by the HTTP API, the infotext and users' code: keep them stable.
_FIELDS: dict[str, _Field] = {
    "method": _Field(str, choices=METHODS, doc="off, batch_wise (Alg. 1), per_sample (Alg. 2) or auto"),
    "rho": _Field(float, 0.0, 1e4, low_open=True, doc="batch-wise probe radius (L2 norm at 16384 elements)"),
    "gamma": _Field(float, 0.0, 100.0, low_open=True, doc="batch-wise step size"),
    "iterations": _Field(int, 1, 100, doc="batch-wise iterations M"),
    "uncond_steps": _Field(
        int, 0, 1000, doc="batch-wise: sampling steps with the unconditional prediction only (K)"
    ),
    "lr": _Field(float, 0.0, 10.0, low_open=True, doc="per-sample AdamW learning rate"),
    "target": _Field(
        float, 0.0, 1e6, doc="per-sample target for ||eps_cond - eps_uncond|| (at 16384 elements)"
    ),
    "max_iterations": _Field(int, 1, 10000, doc="per-sample iteration cap per image"),
    "weight_decay": _Field(float, 0.0, 1.0, doc="per-sample AdamW weight decay"),
    "gradient": _Field(str, choices=GRADIENTS,
                       doc="per-sample gradient: autograd (the paper: backprop through the model) or "
                           "finite_difference (two forward passes, no activations kept)"),
    "fd_radius": _Field(float, 0.0, 1e3, low_open=True,
                        doc="finite_difference: probe distance along eps_tilde/||eps_tilde|| (at 16384 elements)"),
    "optimizer": _Field(str, choices=OPTIMIZERS,
                        doc="per-sample step: polyak (the default: step length from the known target, at most "
                            "max_step) or adamw (the paper's, learning rate lr)"),
    "max_step": _Field(float, 0.0, 10.0, low_open=True,
                       doc="polyak: the largest step, as RMS per element of z (unit variance)"),
    "hold_norm_steps": _Field(int, 0, 10000,
                              doc="polyak: for each image's first N steps the noise keeps its norm (0: off)"),
    "risk_threshold": _Field(
        float, 0.0, 1e6, doc="auto: images with risk >= this are adjusted (at 16384 elements)"
    ),
    "auto_method": _Field(str, choices=AUTO_METHODS, doc="auto: the method applied to images at risk"),
    "scale_with_size": _Field(bool, doc="scale rho, target and risk_threshold by sqrt(numel / 16384)"),
}
_SCALED_FIELDS = ("rho", "target", "risk_threshold", "fd_radius")


def _coerce(name: str, value: Any) -> Any:
    """Convert ``value`` to the field's type, or raise ConfigError naming the field and the allowed values."""
    spec = _FIELDS[name]
    if spec.kind is str:
        if not isinstance(value, str) or value not in spec.choices:
            raise ConfigError(name, f"got {value!r}; allowed: {spec.allowed()}")
        return value
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(name, f"got {value!r}; allowed: {spec.allowed()}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(name, f"got {value!r} ({type(value).__name__}); allowed: {spec.allowed()}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(name, f"got {value!r}; allowed: {spec.allowed()}") from None
    if not math.isfinite(number):
        raise ConfigError(name, f"got {value!r}; allowed: {spec.allowed()}")
    if spec.kind is int:
        if number != int(number):
            raise ConfigError(name, f"got {value!r}, not an integer; allowed: {spec.allowed()}")
        number = int(number)
    assert spec.low is not None and spec.high is not None
    too_low = number <= spec.low if spec.low_open else number < spec.low
    if too_low or number > spec.high:
        raise ConfigError(name, f"got {value!r}; allowed: {spec.allowed()}")
    return number


@dataclass(frozen=True)
class ScaledParams:
    """The size-dependent parameters for one latent shape (what the methods actually use)."""

    rho: float
    target: float
    risk_threshold: float
    scale: float  # sqrt(numel / 16384), or 1 when scale_with_size is off
    fd_radius: float = 1.0


@dataclass(frozen=True)
class MitigationConfig:
    """Every parameter of memsafe. Defaults are the paper's numbers for SD v1.4 at 512 px (DDIM, CFG 7), with one
    exception: the per-sample step is Polyak's (``optimizer="polyak"``), which on the lab model reaches the target
    with a seventh of the paper's AdamW evaluations, replication and alignment within the lab's noise (README, "Default");
    ``optimizer="adamw"`` is the paper's Alg. 2 exactly.

    Construction validates: an out-of-range or unknown value raises :class:`memsafe.ConfigError`, which names the
    field and the allowed values. Instances are immutable; use :meth:`replace` to derive a variant.
    """

    method: str = "per_sample"
    # batch-wise (paper Alg. 1)
    rho: float = 50.0
    gamma: float = 0.7
    iterations: int = 2
    uncond_steps: int = 5
    # per-sample (paper Alg. 2)
    lr: float = 0.01
    target: float = 0.9
    max_iterations: int = 1000
    weight_decay: float = 0.01
    gradient: str = "autograd"
    fd_radius: float = 1.0
    optimizer: str = "polyak"  # the paper's AdamW until 0.2.0: same efficacy on the lab, a seventh of the evaluations
    max_step: float = 0.05
    hold_norm_steps: int = 0
    # auto
    risk_threshold: float = 0.9
    auto_method: str = "per_sample"
    # size
    scale_with_size: bool = True

    def __post_init__(self) -> None:
        for name in _FIELDS:
            object.__setattr__(self, name, _coerce(name, getattr(self, name)))

    # -- derived values -------------------------------------------------------------------------------------
    def scaled(self, numel: int) -> ScaledParams:
        """The size-dependent parameters for a latent of ``numel`` elements per image (C*H*W)."""
        if numel <= 0:
            raise ConfigError("latent size", f"got {numel} elements per image; allowed: a positive integer")
        scale = math.sqrt(numel / REFERENCE_NUMEL) if self.scale_with_size else 1.0
        return ScaledParams(self.rho * scale, self.target * scale, self.risk_threshold * scale, scale,
                            self.fd_radius * scale)

    @property
    def applied_method(self) -> str:
        """The method an at-risk image gets: ``auto_method`` in auto mode, else ``method``."""
        return self.auto_method if self.method == "auto" else self.method

    @property
    def uses_uncond_steps(self) -> bool:
        """Whether sampling must use the unconditional prediction for the first ``uncond_steps`` steps."""
        return self.applied_method == "batch_wise" and self.uncond_steps > 0

    def replace(self, **changes: Any) -> MitigationConfig:
        """A copy with ``changes`` applied (validated; unknown names raise ConfigError)."""
        _reject_unknown(changes)
        return dataclasses.replace(self, **changes)

    # -- (de)serialization ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All fields by name (JSON-compatible)."""
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: MitigationConfig | None = None) -> MitigationConfig:
        """Build from named fields (e.g. the HTTP API), starting from ``base`` (default: the defaults).

        Unknown names raise ConfigError listing the known ones.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(
                "config", f"expected a mapping of field names to values, got {type(values).__name__}"
            )
        _reject_unknown(values)
        return dataclasses.replace(base or cls(), **dict(values))

    def to_string(self) -> str:
        """A compact one-line form for the WebUI infotext: the method, then every field that differs from
        :data:`INFOTEXT_BASELINE` (not from the current defaults, so that a change of a default never changes what
        an old infotext means), as ``key=value`` joined by ``;`` (no commas, so it survives A1111's infotext
        parsing)."""
        parts = [f"method={self.method}"]
        for name in _FIELDS:
            value = getattr(self, name)
            if name != "method" and value != INFOTEXT_BASELINE[name]:
                parts.append(f"{name}={_format(value)}")
        return ";".join(parts)

    @classmethod
    def from_string(cls, text: str) -> MitigationConfig:
        """Parse :meth:`to_string` output, of this version or an earlier one: fields not named take their
        :data:`INFOTEXT_BASELINE` values (e.g. ``optimizer=adamw``), which may differ from the current defaults."""
        if not isinstance(text, str) or not text.strip():
            raise ConfigError("config", "expected 'key=value;key=value...', got an empty string")
        values: dict[str, str] = {}
        for part in text.strip().split(";"):
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep:
                raise ConfigError("config", f"cannot read {part!r}: expected key=value")
            values[key.strip()] = value.strip()
        return cls.from_dict(values, base=cls.from_dict(INFOTEXT_BASELINE))

    # -- presets --------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MitigationConfig:
        """The preset ``name`` (see :data:`PRESETS`) with ``overrides`` applied."""
        if name not in PRESETS:
            raise ConfigError("preset", f"got {name!r}; allowed: one of {', '.join(map(repr, PRESETS))}")
        return cls.from_dict(overrides, base=cls.from_dict(PRESETS[name].values))


# What an infotext's missing fields mean: the defaults of memsafe 0.1.0, the first version that wrote infotexts,
# frozen here. When a default changes, this stays; a new field gets the value that behaves as before it existed.
INFOTEXT_BASELINE: dict[str, Any] = {
    "method": "per_sample", "rho": 50.0, "gamma": 0.7, "iterations": 2, "uncond_steps": 5, "lr": 0.01,
    "target": 0.9, "max_iterations": 1000, "weight_decay": 0.01, "gradient": "autograd", "fd_radius": 1.0,
    "optimizer": "adamw", "max_step": 0.05, "hold_norm_steps": 0, "risk_threshold": 0.9,
    "auto_method": "per_sample", "scale_with_size": True,
}


def _reject_unknown(values: Mapping[str, Any]) -> None:
    unknown = [k for k in values if k not in _FIELDS]
    if unknown:
        raise ConfigError(str(unknown[0]), f"unknown field; known fields: {', '.join(_FIELDS)}")


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest form that reads back to the same float
    return str(value)


def field_docs() -> dict[str, str]:
    """Field name -> one-line description with the allowed values (for UIs and API docs)."""
    return {name: f"{spec.doc} ({spec.allowed()})" for name, spec in _FIELDS.items()}


@dataclass(frozen=True)
class Preset:
    """Named parameter values for one model family, and where the numbers come from."""

    name: str
    family: str
    values: Mapping[str, Any]
    calibrated: bool  # True: numbers from the paper; False: extrapolated by us
    source: str


def _from_k_diffusion_space(value: float, sigma: float = SD_SIGMA_MAX) -> float:
    """A step or radius measured in the sampler's space x = z * sigma, restated in the unit space of z."""
    return value / sigma


# The paper's numbers. SD v1.4 (DDIM 50, CFG 7) in the unit space of z; SD v2.0 (Euler 50, CFG 7) was tuned in the
# sampler's space x = z * sigma_max, so its radius, step and learning rate are divided by sigma_max here.
_SD1_VALUES: dict[str, Any] = {
    "rho": 50.0, "gamma": 0.7, "iterations": 2, "uncond_steps": 5, "lr": 0.01, "target": 0.9,
    "max_iterations": 1000, "weight_decay": 0.01, "risk_threshold": 0.9,
}
_SD2_VALUES: dict[str, Any] = {
    "rho": round(_from_k_diffusion_space(30.0), 4), "gamma": round(_from_k_diffusion_space(0.7), 5),
    "iterations": 4, "uncond_steps": 4, "lr": round(_from_k_diffusion_space(0.1), 6), "target": 10.0,
    "max_iterations": 1000, "weight_decay": 0.01, "risk_threshold": 10.0,
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("sd1", "SD 1.x (eps, 512 px)", _SD1_VALUES, calibrated=True,
               source="paper (SD v1.4, DDIM 50, CFG 7); risk_threshold = target (our choice)"),
        Preset("sd2", "SD 2.x base (eps, 512 px)", _SD2_VALUES, calibrated=True,
               source="paper (SD v2.0, Euler 50, CFG 7): rho 30, gamma 0.7, lr 0.1 given in x = z*sigma_max space, "
                      "divided by 14.61 here; target swept 5..20, 10 taken; risk_threshold = target (our choice)"),
        Preset("sd2-v", "SD 2.x 768-v (v-prediction, 768 px)", _SD2_VALUES, calibrated=False,
               source="extrapolated: the sd2 numbers, scaled to the 4x96x96 latent by sqrt(numel/16384)"),
        Preset("sdxl", "SDXL (eps, 1024 px)", _SD1_VALUES, calibrated=False,
               source="extrapolated: the sd1 numbers, scaled to the 4x128x128 latent by sqrt(numel/16384)"),
    )
}
