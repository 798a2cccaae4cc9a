"""memsafe: memorization mitigation for text-to-image diffusion by adjusting the initial noise.

Implements Han et al., "Adjusting Initial Noise to Mitigate Memorization in Text-to-Image Diffusion Models"
(NeurIPS 2025): the batch-wise (Alg. 1) and per-sample (Alg. 2) methods, a risk score and an auto mode. The core
(this package minus ``hosts`` and ``lab``) imports only torch and numpy.
"""

from .config import PRESETS, MitigationConfig, Preset, ScaledParams
from .errors import ConfigError, GuidanceError, InputError, Interrupted, NotApplicableError
from .guidance import Guidance, GuidanceFn, ModelCalls, guidance_from_denoiser, guidance_from_eps_model
from .methods import (
    NOISE_RMS_LIMIT,
    AdjustResult,
    Evaluations,
    ProgressInfo,
    adjust_noise,
    noise_rms,
    noise_rms_limit,
    risk_score,
    uncond_only,
)
from .sampling import CFGDenoiser

__version__ = "0.3.0"

__all__ = [
    "NOISE_RMS_LIMIT",
    "PRESETS",
    "AdjustResult",
    "CFGDenoiser",
    "ConfigError",
    "Evaluations",
    "Guidance",
    "GuidanceError",
    "GuidanceFn",
    "InputError",
    "Interrupted",
    "MitigationConfig",
    "ModelCalls",
    "NotApplicableError",
    "Preset",
    "ProgressInfo",
    "ScaledParams",
    "adjust_noise",
    "guidance_from_denoiser",
    "guidance_from_eps_model",
    "noise_rms",
    "noise_rms_limit",
    "risk_score",
    "uncond_only",
]
