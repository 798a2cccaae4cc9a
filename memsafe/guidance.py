"""Guidance functions: ``z -> eps_tilde(z) = eps(z, cond) - eps(z, uncond)`` at the first sampling noise level.

The core accepts ANY callable with that contract (users may bring their own model). The builders here return a
:class:`Guidance`, which is such a callable and adds what the methods use when present:

- ``pair(z) -> (cond_part, uncond_part)`` whose difference is ``eps_tilde`` (lets the fused op compute the
  difference and the norm in one pass, and lets the backward run from the model outputs directly);
- ``select(index) -> Guidance`` restricted to some images (so finished images cost no model evaluation);
- ``calls``: how many model invocations and model rows it has spent.

Conditioning is opaque: ``cond`` and ``uncond`` are mappings of keyword arguments passed to the model, whose
tensors (also inside nested dicts, lists and tuples, e.g. A1111's ``{"c_crossattn": [c]}`` or SDXL's
``{"crossattn": c, "vector": y}``) carry one row per model call along dim 0. Anything that is not a tensor is
passed through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import InputError, NotApplicableError

GuidanceFn = Callable[[Tensor], Tensor]
Conditioning = Mapping[str, Any]


# -- rows of opaque conditioning -------------------------------------------------------------------------------
def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def tensors_in(obj: Any) -> list[Tensor]:
    """Every tensor in ``obj`` (nested mappings, lists and tuples), in order."""
    found: list[Tensor] = []
    _map_tensors(obj, lambda t: found.append(t) or t)
    return found


def select_rows(cond: Any, index: Tensor) -> Any:
    """The rows ``index`` of every tensor in ``cond``."""
    return _map_tensors(cond, lambda t: t.index_select(0, index.to(t.device)))


def num_rows(cond: Any) -> int | None:
    """The common number of rows of the tensors in ``cond`` (None if it has no tensor).

    Raises InputError if the tensors disagree.
    """
    sizes = {t.shape[0] for t in tensors_in(cond) if t.dim() > 0}
    if len(sizes) > 1:
        raise InputError(f"memsafe: conditioning tensors have different numbers of rows: {sorted(sizes)}")
    return sizes.pop() if sizes else None


def concat_rows(a: Any, b: Any) -> Any | None:
    """``a`` and ``b`` stacked row-wise, or None where their structures or trailing shapes differ (e.g. prompts of
    different token lengths), in which case they must be evaluated in separate calls."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype or a.device != b.device:
            return None
        return torch.cat([a, b])
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if a.keys() != b.keys():
            return None
        out = {k: concat_rows(a[k], b[k]) for k in a}
        return None if any(v is None and a[k] is not None for k, v in out.items()) else out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return None
        out_list = [concat_rows(x, y) for x, y in zip(a, b, strict=True)]
        return (
            None
            if any(v is None and x is not None for v, x in zip(out_list, a, strict=True))
            else type(a)(out_list)
        )
    return a if a is b or a == b else None


# -- counting --------------------------------------------------------------------------------------------------
@dataclass
class ModelCalls:
    """Model invocations and rows (one row = one latent through the model) spent by a Guidance."""

    calls: int = 0
    rows: int = 0


# -- the Guidance object ---------------------------------------------------------------------------------------
EpsFn = Callable[[Tensor, Conditioning], Tensor]  # (z rows, kwargs) -> eps rows, differentiable in z


class Guidance:
    """``eps_tilde`` for a batch of images with fixed conditioning, from a function giving eps for rows of ``z``.

    Image ``i`` has one uncond row (row ``i`` of ``uncond``) and one or more cond rows: row ``r`` of ``cond``
    belongs to image ``cond_image[r]`` with weight ``cond_weight[r]`` (A1111's ``AND`` prompts), and
    ``eps_tilde_i = sum_r w_r * (eps(z_i, cond_r) - eps(z_i, uncond_i))``.
    """

    def __init__(
        self,
        eps_fn: EpsFn,
        cond: Conditioning,
        uncond: Conditioning,
        *,
        cond_image: Tensor | None = None,
        cond_weight: Tensor | None = None,
        batched: bool = True,
        calls: ModelCalls | None = None,
        _latest: tuple[LatestRows, Tensor] | None = None,
    ) -> None:
        for name, c in (("cond", cond), ("uncond", uncond)):
            if not isinstance(c, Mapping):
                raise InputError(
                    f"memsafe: {name} must be a mapping of keyword arguments for the model "
                    f"(e.g. {{'cond': tensor}}), got {type(c).__name__}"
                )
        self._eps_fn = eps_fn
        self._cond = cond
        self._uncond = uncond
        batch = num_rows(uncond)
        rows = num_rows(cond)
        if batch is None or rows is None:
            raise InputError(
                "memsafe: cond and uncond must contain at least one tensor with one row per call"
            )
        if cond_image is None:
            if rows != batch:
                raise InputError(
                    f"memsafe: cond has {rows} rows and uncond {batch}: pass cond_image (the image of each cond row)"
                )
            cond_image = torch.arange(batch)
        cond_image = torch.as_tensor(cond_image, dtype=torch.long).flatten().cpu()
        if cond_image.numel() != rows or (rows and (cond_image.min() < 0 or cond_image.max() >= batch)):
            raise InputError(
                f"memsafe: cond_image must give, for each of the {rows} cond rows, an image in [0, {batch})"
            )
        if torch.bincount(cond_image, minlength=batch).min() < 1:
            raise InputError("memsafe: every image needs at least one cond row")
        self._identity = (
            cond_weight is None and rows == batch and bool((cond_image == torch.arange(batch)).all())
        )
        weight = (
            torch.ones(rows) if cond_weight is None else torch.as_tensor(cond_weight, dtype=torch.float32)
        )
        if weight.shape != (rows,) or not torch.isfinite(weight).all():
            raise InputError(f"memsafe: cond_weight must be {rows} finite numbers")
        self._cond_image = cond_image
        self._cond_weight = weight.flatten().float().cpu()
        self._batched = batched
        self.calls = calls if calls is not None else ModelCalls()
        self.batch_size = batch
        # where this guidance's model rows (cond rows, then uncond rows, as ``pair`` calls the model) sit in the
        # record of every row's latest evaluation, shared with the guidance it was selected from
        self._latest, self._model_rows = _latest if _latest is not None else (
            LatestRows(rows + batch), torch.arange(rows + batch))

    # -- evaluation --
    def _eps(self, z_rows: Tensor, kwargs: Conditioning) -> Tensor:
        out = self._eps_fn(z_rows, kwargs)
        if not isinstance(out, Tensor) or out.shape != z_rows.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise InputError(
                f"memsafe: the model returned {got} for input {tuple(z_rows.shape)}; expected the same shape"
            )
        self.calls.calls += 1
        self.calls.rows += z_rows.shape[0]
        return out

    def pair(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(cond_part, uncond_part)`` with ``cond_part - uncond_part == eps_tilde(z)``, differentiable in ``z``."""
        if z.dim() < 1 or z.shape[0] != self.batch_size:
            raise InputError(
                f"memsafe: z has shape {tuple(z.shape)}; this guidance is for {self.batch_size} images"
            )
        owner = self._cond_image.to(z.device)
        z_cond = z if self._identity else z.index_select(0, owner)
        both = concat_rows(self._cond, self._uncond) if self._batched else None
        if both is not None:
            eps = self._eps(torch.cat([z_cond, z]), both)
            last = getattr(self._eps_fn, "last", None)
            if isinstance(last, DenoiserCall):
                self._latest.put(self._model_rows, last)
            eps_c, eps_u = eps[: z_cond.shape[0]], eps[z_cond.shape[0] :]
        else:
            eps_c = self._eps(z_cond, self._cond)
            eps_u = self._eps(z, self._uncond)
        if self._identity:
            return eps_c, eps_u
        w = self._cond_weight.to(device=z.device, dtype=eps_c.dtype)
        cond_part = torch.zeros_like(eps_u).index_add(0, owner, eps_c * w.view((-1,) + (1,) * (z.dim() - 1)))
        total_w = torch.zeros(self.batch_size, dtype=eps_u.dtype, device=z.device).index_add(0, owner, w)
        return cond_part, eps_u * total_w.view((-1,) + (1,) * (z.dim() - 1))

    def __call__(self, z: Tensor) -> Tensor:
        """``eps_tilde(z)`` for the batch, differentiable in ``z`` when autograd is enabled."""
        cond_part, uncond_part = self.pair(z)
        return cond_part - uncond_part

    @property
    def last_call(self) -> DenoiserCall | None:
        """One batched denoiser call (cond rows, then uncond rows, as :meth:`pair` makes it) that evaluates every
        image at the inputs of its latest evaluation, with those evaluations' outputs: a sampler whose first step
        makes exactly this call may take ``denoised`` instead of calling the model (CFGDenoiser's ``reuse``, the
        WebUI's stand-in): auto mode's risk evaluation, or the per-sample method's last check of each image, made
        where it stopped. A row's output does not depend on the other rows' values, so rows may come from
        different calls, run with or without autograd (the same kernels). Its ``same_bits`` says whether every
        row sat at its place in a call of this layout's size (auto leaving the noise unchanged, per-sample images
        all stopping in the same iteration, one image): then ``denoised`` is the bits the sampler's own call gives
        (tests/test_sampling.py compares the images bit for bit); otherwise it is equal up to batch-size
        round-off, as batched adjustment is to one image at a time. None unless the guidance is denoiser-based and
        batched and every row has been evaluated."""
        both = concat_rows(self._cond, self._uncond) if self._batched else None
        rows = self._latest.get(self._model_rows) if both is not None else None
        if rows is None:
            return None
        x, sigma, denoised, same_bits = rows
        return DenoiserCall(x, sigma, both, denoised, same_bits)

    def call_at(self, z: Tensor) -> DenoiserCall | None:
        """:attr:`last_call` if it evaluated every image at exactly ``z`` (the noise a sampler will start from;
        compared exactly), else None."""
        call = self.last_call
        model_input = getattr(self._eps_fn, "model_input", None)
        if call is None or model_input is None or z.dim() < 1 or z.shape[0] != self.batch_size:
            return None
        z_cond = z if self._identity else z.index_select(0, self._cond_image.to(z.device))
        x = model_input(torch.cat([z_cond, z]))
        return call if x.shape == call.x.shape and x.dtype == call.x.dtype and bool(torch.equal(x, call.x)) else None

    def select(self, index: Tensor) -> Guidance:
        """The same guidance restricted to images ``index`` (in that order); shares the call counter."""
        index = torch.as_tensor(index, dtype=torch.long).flatten().cpu()
        remap = torch.full((self.batch_size,), -1, dtype=torch.long)
        remap[index] = torch.arange(index.numel())
        rows = (remap[self._cond_image] >= 0).nonzero().flatten()
        return Guidance(
            self._eps_fn,
            select_rows(self._cond, rows),
            select_rows(self._uncond, index),
            cond_image=remap[self._cond_image[rows]],
            cond_weight=None if self._identity else self._cond_weight[rows],
            batched=self._batched,
            calls=self.calls,
            _latest=(self._latest, torch.cat([self._model_rows[rows],
                                              self._model_rows[self._cond_image.numel() + index]])),
        )


def check_guidance_scale(guidance_scale: float | None) -> None:
    """Raise NotApplicableError unless classifier-free guidance is on (scale > 1). None means unknown: accepted."""
    if guidance_scale is None:
        return
    if not math.isfinite(float(guidance_scale)) or guidance_scale <= 1.0:
        raise NotApplicableError(
            f"memsafe: guidance_scale={guidance_scale}: the methods need classifier-free guidance "
            "(guidance_scale > 1); at 1 or below the prompt's guidance term is not amplified and there is nothing "
            "to mitigate. Use a CFG scale above 1 or turn memsafe off."
        )


def _positive_float(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise InputError(f"memsafe: {name} must be a positive finite number, got {value}")
    return value


# -- builders --------------------------------------------------------------------------------------------------
def guidance_from_denoiser(
    denoiser: Callable[..., Tensor],
    sigma: float,
    cond: Conditioning,
    uncond: Conditioning,
    *,
    sgm_noise_multiplier: bool = False,
    cond_image: Tensor | None = None,
    cond_weight: Tensor | None = None,
    batched: bool = True,
    guidance_scale: float | None = None,
    model_dtype: torch.dtype | None = None,
) -> Guidance:
    """Guidance from a k-diffusion style denoiser ``D(x, sigma, **kwargs) -> denoised x`` (A1111's
    ``p.sampler.model_wrap``), at the sampler's first noise level ``sigma``.

    The sampler starts from ``x = z * sigma`` (``z * sqrt(1 + sigma^2)`` with A1111's SGM noise multiplier), and
    ``eps = (x - D(x, sigma)) / sigma``, valid for eps- and v-prediction models alike. The methods work on
    float32 noise; ``model_dtype`` casts the denoiser's input to the model's dtype (fp16 weights) where the
    denoiser does not cast it itself, as the WebUIs' models do.
    """
    check_guidance_scale(guidance_scale)
    sigma = _positive_float("sigma", sigma)
    x_scale = math.sqrt(1.0 + sigma * sigma) if sgm_noise_multiplier else sigma
    eps_fn = _DenoiserEps(denoiser, sigma, x_scale, model_dtype)
    return Guidance(eps_fn, cond, uncond, cond_image=cond_image, cond_weight=cond_weight, batched=batched)


def same_values(a: object, b: object) -> bool:
    """Whether two conditionings hold the same values (tensors compared exactly)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b.to(a)))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b))
    return a is b or a == b


@dataclass
class DenoiserCall:
    """A call of a denoiser by a guidance: a sampler's first step at the same ``x`` and ``sigma`` with the same
    conditioning would compute exactly ``denoised`` again (see CFGDenoiser's ``reuse``)."""

    x: Tensor
    sigma: Tensor
    kwargs: Conditioning
    denoised: Tensor
    same_bits: bool = True  # False: rows from calls of other sizes, equal to this call's up to round-off

    def matches(self, x: Tensor, sigma: Tensor, kwargs: Conditioning) -> bool:
        """Whether ``denoiser(x, sigma, **kwargs)`` is this call again: the same inputs, compared exactly."""
        return (self.x.shape == x.shape and bool(torch.equal(self.x, x))
                and self.sigma.shape == sigma.shape and bool(torch.equal(self.sigma.to(sigma), sigma))
                and same_values(self.kwargs, kwargs))


class _ModelEps:
    """eps rows from a model ``model(x, t, **kwargs)`` at one timestep (eps, or v converted with the timestep's
    ``(sqrt(a), sqrt(1 - a))``); remembers its last call (detached, the model's own output)."""

    def __init__(self, model: Callable[..., Tensor], timestep: float, model_dtype: torch.dtype | None,
                 v_to_eps: tuple[float, float] | None) -> None:
        self.model, self.timestep, self.model_dtype, self.v_to_eps = model, timestep, model_dtype, v_to_eps
        self.last: DenoiserCall | None = None

    def model_input(self, z_rows: Tensor) -> Tensor:
        """The sampler's x at the first timestep for these rows of noise: the noise itself (unit variance)."""
        return z_rows if self.model_dtype is None else z_rows.to(self.model_dtype)

    def __call__(self, z_rows: Tensor, kwargs: Conditioning) -> Tensor:
        x = self.model_input(z_rows)
        t = torch.full((z_rows.shape[0],), self.timestep, device=z_rows.device)
        out = self.model(x, t, **kwargs)
        self.last = DenoiserCall(x.detach(), t, kwargs, out.detach())
        if self.v_to_eps is not None:
            sqrt_a, sqrt_1ma = self.v_to_eps
            out = sqrt_a * out + sqrt_1ma * x
        return out


class LatestRows:
    """Every model row's latest evaluation (the denoiser's input, sigma and output; how many rows its call had and
    where in it the row sat), by row of a guidance's full layout (cond rows, then uncond rows). Shared by a
    guidance and its selections; a few latents in size."""

    def __init__(self, rows: int) -> None:
        self.call_rows = torch.zeros(rows, dtype=torch.long)  # 0: never evaluated
        self.call_position = torch.zeros(rows, dtype=torch.long)
        self.x: Tensor | None = None
        self.sigma: Tensor | None = None
        self.denoised: Tensor | None = None

    def put(self, where: Tensor, call: DenoiserCall) -> None:
        """Rows ``where`` are the rows of ``call`` (in order); copies, so later in-place edits cannot reach them."""
        x, denoised = call.x.detach(), call.denoised.detach()
        if (self.x is None or self.denoised is None or self.x.shape[1:] != x.shape[1:] or self.x.dtype != x.dtype
                or self.x.device != x.device or self.denoised.dtype != denoised.dtype):
            size = self.call_rows.numel()
            self.x = x.new_zeros((size, *x.shape[1:]))
            self.sigma = call.sigma.new_zeros(size)
            self.denoised = denoised.new_zeros((size, *denoised.shape[1:]))
            self.call_rows.zero_()
        assert self.sigma is not None
        at = where.to(x.device)
        self.x.index_copy_(0, at, x)
        self.sigma.index_copy_(0, at, call.sigma.detach().to(self.sigma))
        self.denoised.index_copy_(0, at, denoised)
        self.call_rows[where] = x.shape[0]
        self.call_position[where] = torch.arange(where.numel())

    def get(self, where: Tensor) -> tuple[Tensor, Tensor, Tensor, bool] | None:
        """(x, sigma, denoised, same_bits) of rows ``where``, or None unless each of them has been evaluated.
        ``same_bits``: each row was last evaluated in a call of ``len(where)`` rows at its place in ``where``, so
        the outputs are the bits one call of ``where`` gives; otherwise they are equal up to the round-off by
        which a kernel may treat another batch size differently (CPU: 2e-5 apart), as a row's output does not
        depend on the other rows' values."""
        n = where.numel()
        if (self.x is None or self.sigma is None or self.denoised is None
                or not bool((self.call_rows[where] > 0).all())):
            return None
        same_bits = bool((self.call_rows[where] == n).all()) and bool(
            torch.equal(self.call_position[where], torch.arange(n)))
        at = where.to(self.x.device)
        return (self.x.index_select(0, at), self.sigma.index_select(0, at), self.denoised.index_select(0, at),
                same_bits)


class _DenoiserEps:
    """eps rows from a k-diffusion denoiser at one noise level; remembers its last call (detached)."""

    def __init__(self, denoiser: Callable[..., Tensor], sigma: float, x_scale: float,
                 model_dtype: torch.dtype | None) -> None:
        self.denoiser, self.sigma, self.x_scale, self.model_dtype = denoiser, sigma, x_scale, model_dtype
        self.last: DenoiserCall | None = None

    def model_input(self, z_rows: Tensor) -> Tensor:
        """The sampler's x at the first level for these rows of unit-variance noise (what the denoiser gets)."""
        x = z_rows * self.x_scale
        return x if self.model_dtype is None else x.to(self.model_dtype)

    def __call__(self, z_rows: Tensor, kwargs: Conditioning) -> Tensor:
        x = self.model_input(z_rows)
        sigmas = torch.full((z_rows.shape[0],), self.sigma, device=z_rows.device, dtype=x.dtype)
        denoised = self.denoiser(x, sigmas, **kwargs)
        self.last = DenoiserCall(x.detach(), sigmas, kwargs, denoised.detach())
        return (x - denoised) / self.sigma


def guidance_from_eps_model(
    model: Callable[..., Tensor],
    timestep: float,
    cond: Conditioning,
    uncond: Conditioning,
    *,
    prediction: str = "eps",
    alpha_bar: float | None = None,
    cond_image: Tensor | None = None,
    cond_weight: Tensor | None = None,
    batched: bool = True,
    guidance_scale: float | None = None,
    model_dtype: torch.dtype | None = None,
) -> Guidance:
    """Guidance from a model ``model(x, t, **kwargs)`` returning eps (or v with ``prediction="v"``) at timestep
    ``timestep``, for DDIM-family samplers that start from ``x = z`` (unit variance).

    For v-prediction, ``alpha_bar`` (the cumulative alpha at ``timestep``) converts: ``eps = sqrt(a) v + sqrt(1-a) x``.
    """
    check_guidance_scale(guidance_scale)
    if prediction not in ("eps", "v"):
        raise InputError(f"memsafe: prediction must be 'eps' or 'v', got {prediction!r}")
    if prediction == "v":
        if alpha_bar is None or not 0.0 < float(alpha_bar) < 1.0:
            raise InputError(
                f"memsafe: v-prediction needs alpha_bar in (0, 1) at the timestep, got {alpha_bar!r}"
            )
        sqrt_a, sqrt_1ma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    eps_fn = _ModelEps(model, float(timestep), model_dtype, (sqrt_a, sqrt_1ma) if prediction == "v" else None)
    return Guidance(eps_fn, cond, uncond, cond_image=cond_image, cond_weight=cond_weight, batched=batched)
