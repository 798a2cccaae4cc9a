"""The MemSafe script's arguments, as the WebUI UI and its HTTP API pass them, parsed without any host import.

Positional order (``alwayson_scripts: {"memsafe": {"args": [...]}}``; missing trailing args take the defaults)::

    0 enabled          bool
    1 method           "batch_wise" | "per_sample" | "auto"
    2 preset           "auto" (by model family) | "sd1" | "sd2" | "sd2-v" | "sdxl" | "custom"
    3.. the MitigationConfig fields in FIELD_ORDER, used only with preset "custom", except PRESET_FREE ones

Or one dict in slot 0: ``{"enabled": true, "method": "per_sample", "preset": "sdxl", "target": 1.2}``: the
preset's values (auto: by model family) with the given fields on top; the other slots are then ignored. Every key other than ``enabled`` and
``preset`` must be a MitigationConfig field name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..config import PRESETS, MitigationConfig
from ..errors import ConfigError

UI_METHODS = ("batch_wise", "per_sample", "auto")
PRESET_CHOICES = ("auto", *PRESETS.keys(), "custom")
# The MitigationConfig fields, in the order of the positional API arguments 3, 4, ...
FIELD_ORDER = (
    "rho",
    "gamma",
    "iterations",
    "uncond_steps",
    "lr",
    "target",
    "max_iterations",
    "weight_decay",
    "risk_threshold",
    "auto_method",
    "scale_with_size",
    "gradient",
    "fd_radius",
    "optimizer",
    "max_step",
    "hold_norm_steps",
)
ARG_NAMES = ("enabled", "method", "preset", *FIELD_ORDER)
# Fields no preset sets (how per-sample computes its steps, not the paper's calibrated values): they apply with
# every preset, so a WebUI user can pick the Polyak step or the forward-only gradient without going "custom".
PRESET_FREE = ("gradient", "fd_radius", "optimizer", "max_step", "hold_norm_steps")
DEFAULT_METHOD = "auto"


@dataclass(frozen=True)
class ScriptRequest:
    """What the user asked for: whether MemSafe is on, the preset to start from, and explicit field values."""

    enabled: bool
    method: str
    preset: str  # one of PRESET_CHOICES
    overrides: Mapping[str, Any]  # explicit MitigationConfig fields (on top of the preset)

    def resolve(self, family: str) -> MitigationConfig:
        """The config for a model of preset family ``family`` (used when preset is "auto")."""
        preset = family if self.preset == "auto" else self.preset
        base = MitigationConfig() if preset == "custom" else MitigationConfig.from_preset(preset)
        values = {**self.overrides, "method": self.method}
        return MitigationConfig.from_dict(values, base=base)


OFF = ScriptRequest(False, DEFAULT_METHOD, "auto", {})


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ConfigError(name, f"got {value!r}; allowed: true or false")


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if isinstance(value, str):
        normalized = value.strip().lower().replace("-", "_") if name == "method" else value.strip().lower()
        if normalized in choices:
            return normalized
    raise ConfigError(name, f"got {value!r}; allowed: one of {', '.join(map(repr, choices))}")


def parse_script_args(args: Sequence[Any] | None) -> ScriptRequest:
    """Read the script's arguments (positional list, or a dict in slot 0). Raises ConfigError naming the field,
    the value and the allowed values. Off (``enabled`` false or absent) is returned without further checks of
    the other values, so a disabled MemSafe never stands in the way of a generation."""
    args = list(args or [])
    if args and isinstance(args[0], Mapping):
        # The WebUI's API fills the slots after the dict with the UI's defaults (api.py L315-361): ignore them.
        named = dict(args[0])
    else:
        if len(args) > len(ARG_NAMES):
            raise ConfigError("args", f"got {len(args)} positional values; at most {len(ARG_NAMES)}: {', '.join(ARG_NAMES)}")
        named = {name: value for name, value in zip(ARG_NAMES, args) if value is not None}
        if named.get("preset", "auto") != "custom":  # positional field values only count with preset "custom"
            named = {k: v for k, v in named.items() if k in ("enabled", "method", "preset", *PRESET_FREE)}
    enabled = _as_bool("enabled", named.pop("enabled", False))
    if not enabled:
        return OFF
    method = _choice("method", named.pop("method", DEFAULT_METHOD), UI_METHODS)
    preset = _choice("preset", named.pop("preset", "auto"), PRESET_CHOICES)
    request = ScriptRequest(True, method, preset, named)
    request.resolve(next(iter(PRESETS)))  # validates every field now (field names, types, ranges)
    return request
