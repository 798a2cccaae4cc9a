"""memsafe lab: a small text-to-image diffusion model that really memorizes, an evaluation that measures
replication, and the demo a new user runs first. Runs anywhere on a CPU, with no download.

- ``data``: deterministic coloured-shape images with captions; generic captions, CFG-driven memorized captions
  (many varied images plus one image duplicated many times) and point-mass memorized captions (one image only).
- ``model``: a small text encoder and a diffusers UNet2DConditionModel (pixel space, SD's DDPM schedule).
- ``sampler``: DDIM with classifier-free guidance and memsafe's unconditional-only first steps, per image.
- ``train``, ``evaluate``, ``demo``: the command-line entry points (``python -m memsafe.lab.<name>``).

The lab imports diffusers, safetensors and matplotlib; the core of memsafe does not depend on it.
"""
