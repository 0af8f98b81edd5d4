"""Rectified-flow samplers: integrate dx/dt = v(x, t) from t = 1 (noise) down to t = 0 (data).

Every sampler has one signature (as in k-diffusion's sampling.py):

    fn(model, x, timesteps, *, generator=None, callback=None) -> x0

- `model(x, t) -> v`: any callable velocity model, t a (B,) tensor (1 = pure noise); wrap an MMDiT with its
  text condition, or with `guided(...)` for classifier-free guidance.
- `x` (B, ...) the starting point at timesteps[0] (pure noise at t = 1, or a noised image for image-to-image);
  `timesteps` a 1-D tensor decreasing to 0 (see `make_timesteps`, `enter_timesteps`); step i moves x from t_i to
  t_{i+1} with dt = t_i − t_{i+1} > 0, so x ← x − v·dt in the source's notation.
- `callback(info)` is called after every step with {"i", "t", "t_next", "x", "x0"} (x0 = the current
  prediction of the clean sample, x - t·v).

The samplers (SAMPLERS): `euler`, `euler_stochastic` and `heun` are the source's (SEED_SPEC §l, its
diff_model.sample_imgs); `euler_ancestral` (DDIM-η / k-diffusion's ancestral step) and `heun_edm` (Heun with an
Euler last step) are ours, kept under their own names.

The source's time grid is t_i = linspace(1, 1/N, N) with a constant dt = 1/N: the model sees t = 1, 1 − 1/N, …,
1/N and the last step lands on t = 0. `make_timesteps(N)` is that grid with its end point 0 appended, so every
sampler here runs the source's steps exactly when shift = 1.

Paths follow the training convention of sd3/train/flow.py: x_t = (1 - t)·x0 + t·eps, v = eps - x0, hence
x0 = x_t - t·v and eps = x_t + (1 - t)·v for any point on a path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch

VelocityModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def make_timesteps(num_steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """num_steps + 1 times from 1 down to 0, uniform in t, optionally shifted towards the noise end.

    With shift s != 1 each t becomes s·t / (1 + (s - 1)·t) (SD3 paper §5.3.2, eq. 23, the resolution-dependent
    shift with s = sqrt(m/n)): more steps are spent at high noise, which larger images need. t = 1 and t = 0
    are fixed points, so the schedule still starts at pure noise and ends at data. Returns float64 so the
    step sizes are exact; samplers cast when they build the model's t.
    """
    if num_steps < 1:
        raise ValueError(f"make_timesteps: num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"make_timesteps: shift must be > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64, device=device)  # (N+1,)
    return shift * t / (1.0 + (shift - 1.0) * t)


def enter_timesteps(num_steps: int, strength: float, shift: float = 1.0,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Image-to-image: the grid of `make_timesteps(num_steps, shift)` entered at t = strength.

    The times of the full grid below `strength`, with `strength` itself put first: the sampler starts from an image
    noised to exactly t = strength and then follows the same steps a full run would take (so ~strength·N steps
    with shift 1; with shift 1 and strength·N a whole number this is diffusers' img2img truncation). strength 1 is
    the full grid; strength 0 is [0.0], no step at all (the caller returns the image's own latents).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    full = make_timesteps(num_steps, shift, device)  # (N+1,)
    # The 1e-9 drops a grid point equal to strength up to rounding, which would leave a sliver of a first step.
    return torch.cat([full.new_tensor([strength]), full[full < strength - 1e-9]])


def _check(timesteps: torch.Tensor) -> list[float]:
    if timesteps.dim() != 1 or timesteps.numel() < 2:
        raise ValueError(f"sampler: timesteps must be a 1-D tensor of >= 2 times, got shape {tuple(timesteps.shape)}")
    ts = [float(t) for t in timesteps]
    if any(b >= a for a, b in pairwise(ts)):
        raise ValueError(f"sampler: timesteps must strictly decrease (from 1 towards 0), got {ts[:4]}...")
    return ts


def _t_batch(t: float, x: torch.Tensor) -> torch.Tensor:
    """The model's time input: (B,) in fp32 (fp64 when x is fp64), never in x's bf16, whose 8-bit mantissa
    would blur t by up to 0.4% — the model multiplies t by a learnt scale of ~1000."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)


def _velocity(model: VelocityModel, x: torch.Tensor, t: float) -> torch.Tensor:
    return model(x, _t_batch(t, x)).to(x.dtype)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) shaped like x, drawn on the generator's device (so a CPU generator replays on any device)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def euler(
    model: VelocityModel,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Explicit Euler on the probability-flow ODE dx/dt = v(x, t): x_{i+1} = x_i - dt·v(x_i, t_i), dt = t_i - t_{i+1}.

    The source's `euler` (SEED_SPEC §l: x ← x − v·dt), the rectified-flow sampler of the SD3 paper and diffusers'
    FlowMatchEulerDiscreteScheduler. Deterministic; `generator` is accepted for the common signature. The model is
    never evaluated at t = 0.
    """
    ts = _check(timesteps)
    for i, (t, t_next) in enumerate(pairwise(ts)):
        v = _velocity(model, x, t)  # (B, ...)
        x_next = x - (t - t_next) * v
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x_next, "x0": x - t * v})
        x = x_next
    return x


def source_sigma(t: float) -> float:
    """The source's noise scale for euler_stochastic (SEED_SPEC §l): σ(t) = t(1 − t) / (1 − t + 0.008).

    Zero at both ends (t = 1: pure noise needs none; t = 0: none added to the data), largest (~0.84) near t = 0.9;
    the 0.008 keeps the denominator away from 0 at t = 1.
    """
    return t * (1.0 - t) / (1.0 - t + 0.008)


@torch.no_grad()
def euler_stochastic(
    model: VelocityModel,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The source's stochastic Euler (SEED_SPEC §l): x ← x − v·dt + σ(t)·z·√dt, z ~ N(0, I), σ = `source_sigma`.

    An Euler–Maruyama step of dx = v dt + σ(t) dW̄ with σ evaluated at the current t. Unlike `euler_ancestral` it
    adds no score correction for the injected noise, so it does not keep the flow's marginals: it injects
    Σ σ(t_i)²·dt ≈ 0.29 of variance over a uniform grid, and on a N(0.7, 0.5²) target with its exact velocity field
    the std comes out ~1.25× too large at 50 or 200 steps (tested). That is what the source does; use
    `euler_ancestral` for a marginal-preserving stochastic sampler. Reproducible when `generator` is given (z is
    drawn from it on its device).
    """
    ts = _check(timesteps)
    for i, (t, t_next) in enumerate(pairwise(ts)):
        v = _velocity(model, x, t)  # (B, ...)
        dt = t - t_next
        # z is drawn on every step, σ(1) = 0 included, as the formula reads: one draw per step keeps the stream simple.
        x_next = x - dt * v + source_sigma(t) * math.sqrt(dt) * _noise(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x_next, "x0": x - t * v})
        x = x_next
    return x


@torch.no_grad()
def heun(
    model: VelocityModel,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """The source's Heun (SEED_SPEC §l), the explicit trapezoidal rule (Heun 1900; Süli & Mayers §12.5) on every step.

    v₁ = v(x, t); x̃ = x − v₁·dt; v₂ = v(x̃, t − dt); x ← x − (dt/2)(v₁ + v₂). The corrector runs on the last step
    too, so the model is evaluated at t = 0 (the network's velocity eps − x0 is still defined there) and a run of N
    steps costs 2N model calls. (The source's text-loss unpacking bug for v₂ has no counterpart here: the velocity
    model returns one tensor.) Deterministic. See `heun_edm` for the variant whose last step stays Euler.
    """
    ts = _check(timesteps)
    for i, (t, t_next) in enumerate(pairwise(ts)):
        dt = t - t_next
        v1 = _velocity(model, x, t)  # (B, ...)
        v2 = _velocity(model, x - dt * v1, t_next)  # (B, ...)
        x_next = x - 0.5 * dt * (v1 + v2)
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x_next, "x0": x - t * v1})
        x = x_next
    return x


@torch.no_grad()
def heun_edm(
    model: VelocityModel,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's 2nd-order method as Karras et al. 2022 (EDM), Algorithm 1, written in t instead of sigma.

    As `heun`, except that the last step (t_next = 0) stays Euler, as in EDM: the model is never evaluated at pure
    data (a point training's t ~ logit-normal never draws), and N steps cost 2·N − 1 model calls. Deterministic.
    """
    ts = _check(timesteps)
    for i, (t, t_next) in enumerate(pairwise(ts)):
        d = _velocity(model, x, t)  # (B, ...)
        x_next = x + (t_next - t) * d
        if t_next > 0:
            d_next = _velocity(model, x_next, t_next)
            x_next = x + (t_next - t) * 0.5 * (d + d_next)
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x_next, "x0": x - t * d})
        x = x_next
    return x


@torch.no_grad()
def euler_ancestral(
    model: VelocityModel,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """Stochastic (ancestral) Euler: each step lands back on a rectified-flow path with partly fresh noise.

    Algorithm (k-diffusion's `sample_euler_ancestral` / `get_ancestral_step`, i.e. DDIM with eta, Song et al.
    2021 eq. 12, mapped to rectified flow): from v = model(x, t) take the predictions
        x0 = x - t·v,        eps = x + (1 - t)·v          (so x = (1 - t)·x0 + t·eps)
    and place the next point on the straight path at t_next, mixing eps with fresh noise z ~ N(0, I):
        x_next = (1 - t_next)·x0 + sqrt(t_next² - sigma²)·eps + sigma·z,
        sigma  = eta · t_next · sqrt(1 - (s_next / s)²),   s = t / (1 - t)  (the equivalent VE noise level).
    Given x0, x_next has exactly the path marginal (1 - t_next)·x0 + t_next·N(0, I) for any sigma <= t_next.
    eta = 0 is plain Euler; eta = 1 adds DDPM's posterior noise, and as the steps shrink the update becomes the
    Euler–Maruyama step of the reverse-time SDE with the same marginals as the flow,
        dx = [v + eps/(1 - t)] dt + g dW̄,  g(t)² = 2t / (1 - t)   (dt < 0).
    The first step (t = 1) draws fresh noise entirely; the last (t_next = 0) adds none and returns x0.
    (This was `euler_stochastic` before the source's own sampler took that name.)
    Reproducible when `generator` is given (z is drawn from it on its device).
    Tolerance: for a point-mass target x0 the velocity field is exact and so is every x0 prediction, so the
    result equals x0 up to rounding (tested < 1e-4). For a Gaussian target N(mu, s²) with its exact field, 200
    steps with eta = 1 give a mean within 5 standard errors of mu and a standard deviation within 5% of s
    (the scheme is first order: the std falls short by ~2.4% at 200 steps, ~0.3% at 1000; the sampling error
    of the std is ~0.6% here), tested on 16384 values in tests/sample/test_samplers.py.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"euler_ancestral: eta must be in [0, 1], got {eta}")
    ts = _check(timesteps)
    for i, (t, t_next) in enumerate(pairwise(ts)):
        v = _velocity(model, x, t)  # (B, ...)
        x0 = x - t * v
        eps = x + (1.0 - t) * v
        if t >= 1.0:
            ratio = 0.0  # s = inf: the DDPM posterior at pure noise keeps nothing of eps
        else:
            ratio = (t_next * (1.0 - t)) / (t * (1.0 - t_next))  # s_next / s
        sigma = min(t_next, eta * t_next * math.sqrt(max(0.0, 1.0 - ratio * ratio)))
        x_next = (1.0 - t_next) * x0 + math.sqrt(max(0.0, t_next * t_next - sigma * sigma)) * eps
        if sigma > 0:
            x_next = x_next + sigma * _noise(x, generator)
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x_next, "x0": x0})
        x = x_next
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": euler,
    "euler_stochastic": euler_stochastic,
    "heun": heun,
    "euler_ancestral": euler_ancestral,
    "heun_edm": heun_edm,
}
STOCHASTIC = ("euler_stochastic", "euler_ancestral")  # the samplers that draw from `generator`


def _batchable(cond: dict[str, Any], uncond: dict[str, Any]) -> bool:
    if cond.keys() != uncond.keys():
        return False
    for k in cond:
        a, b = cond[k], uncond[k]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
    return True


def guided(
    model_fn: Callable[..., torch.Tensor],
    cond: dict[str, Any],
    uncond: dict[str, Any],
    scale: float,
) -> VelocityModel:
    """Classifier-free guidance as a velocity model `v(x, t)` for the samplers.

    v = v_cond + scale·(v_cond - v_uncond), with v_cond = model_fn(x, t, **cond), v_uncond = model_fn(x, t,
    **uncond). This is Ho & Salimans 2022 ("Classifier-Free Diffusion Guidance", eq. 6) with guidance weight
    w = scale: scale 0 is exactly the conditional model (issue 2), larger values follow the prompt more (the
    source README suggests CFG_scale 5-7). In the other common convention, v_uncond + g·(v_cond - v_uncond)
    (diffusers' guidance_scale), this scale equals g - 1.

    cond / uncond are keyword tensors for model_fn (e.g. context=(B, 2T, D), pooled=(B, P)); for the MMDiT the
    unconditional input is all zeros, which is what training's cfg_dropout feeds it. When both dicts have the
    same keys, shapes and dtypes, one forward of 2B runs instead of two of B. Scale 0 skips the unconditional
    forward.
    """
    if scale == 0:
        return lambda x, t: model_fn(x, t, **cond)

    if _batchable(cond, uncond):
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}  # (2B, ...)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v_cond, v_uncond = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)  # (B, ...) each
            return v_cond + scale * (v_cond - v_uncond)

        return velocity

    def velocity_two_passes(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond = model_fn(x, t, **cond)
        v_uncond = model_fn(x, t, **uncond)
        return v_cond + scale * (v_cond - v_uncond)

    return velocity_two_passes
