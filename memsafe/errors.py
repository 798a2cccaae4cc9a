"""Exceptions memsafe raises on purpose. Each message names what was wrong and what is allowed."""

from __future__ import annotations


class ConfigError(ValueError):
    """A parameter is out of range or unknown. ``field`` names it; the message gives the allowed values."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"memsafe: {field}: {message}")
        self.field = field


class InputError(ValueError):
    """The noise or the model output given to memsafe is unusable (shape, dtype, NaN/Inf)."""


class NotApplicableError(ValueError):
    """Mitigation cannot apply to this generation (e.g. guidance scale <= 1: no classifier-free guidance)."""


class GuidanceError(RuntimeError):
    """The model produced NaN/Inf while memsafe was evaluating it; nothing was changed."""


class Interrupted(RuntimeError):
    """``should_stop()`` returned True: the adjustment was abandoned (e.g. Interrupt or Skip in the WebUI)."""
