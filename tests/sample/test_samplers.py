"""Samplers (sd3/sample/samplers.py): closed-form cases, and the source's update rules (SEED_SPEC §l) re-done by
hand on a stand-in velocity field."""

import math

import pytest
import torch

from sd3.sample.samplers import (
    SAMPLERS,
    enter_timesteps,
    euler,
    euler_ancestral,
    euler_stochastic,
    guided,
    heun,
    make_timesteps,
    source_sigma,
)

DETERMINISTIC = ["euler", "heun", "heun_edm"]
NEVER_AT_ZERO = ["euler", "heun_edm", "euler_ancestral"]  # the samplers that never evaluate the model at t = 0


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    # Not torch's assert_close: its first call spends ~2 s on lazy imports.
    return a.shape == b.shape and (a - b).abs().max().item() <= tol * (1 + b.abs().max().item())


def _towards(x0: torch.Tensor):
    """The exact rectified-flow velocity when all data is the point x0: straight lines to x0."""

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert bool((t > 0).all()), "a sampler evaluated the model at t = 0"
        return (x - x0) / t.view(-1, *([1] * (x.dim() - 1)))

    return v


MU, S = 0.7, 0.5


def _gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact velocity E[eps - x0 | x_t = x] when the data is N(MU, S²) per element (x_t = (1-t)x0 + t·eps)."""
    t = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    a = 1 - t
    var = a * a * S * S + t * t  # Var(x_t)
    return (t - a * S * S) / var * (x - a * MU) - MU


def _stand_in(calls: list[float] | None = None):
    """A velocity field nonlinear in x and t (so every rule above first order shows), recording each t it sees."""

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(float(t[0]))
        tt = t.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return torch.sin(x) * (1 + tt * tt) - 0.3 * tt

    return v


@pytest.mark.parametrize("name", NEVER_AT_ZERO)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_samplers_reach_a_fixed_x0_exactly(name, shift):
    g = _gen(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    out = SAMPLERS[name](_towards(x0), noise, make_timesteps(10, shift=shift), generator=g)
    assert out.shape == x0.shape
    assert (out - x0).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_follow_a_straight_path_exactly(name):
    """v = eps - x0 everywhere (one straight path, defined at t = 0 too): any of them lands on x0 from eps."""
    g = _gen(9)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    out = SAMPLERS[name](lambda x, t: eps - x0, eps, make_timesteps(7, shift=2.0))
    assert _close(out, x0)


def test_source_euler_rule_by_hand():
    """Source: t_i = linspace(1, 1/N, N), dt = 1/N, x <- x - v·dt."""
    n, x = 6, torch.randn(2, 3, 4, generator=_gen(10), dtype=torch.float64)
    calls: list[float] = []
    out = euler(_stand_in(calls), x, make_timesteps(n))
    ref, dt = x.clone(), 1.0 / n
    for t in torch.linspace(1, 1 / n, n, dtype=torch.float64).tolist():
        ref = ref - _stand_in()(ref, torch.full((2,), t, dtype=torch.float64)) * dt
    assert _close(out, ref, 1e-12)
    assert calls == pytest.approx(torch.linspace(1, 1 / n, n).tolist())  # never t = 0


def test_source_heun_rule_by_hand_corrects_the_last_step_too():
    """Source: v1 = v(x, t); x~ = x - v1·dt; v2 = v(x~, t - dt); x <- x - dt/2·(v1 + v2), on every step."""
    n, x = 5, torch.randn(2, 3, 4, generator=_gen(11), dtype=torch.float64)
    calls: list[float] = []
    out = heun(_stand_in(calls), x, make_timesteps(n))
    ref, dt, v = x.clone(), 1.0 / n, _stand_in()
    for t in torch.linspace(1, 1 / n, n, dtype=torch.float64).tolist():
        tb = torch.full((2,), t, dtype=torch.float64)
        v1 = v(ref, tb)
        v2 = v(ref - v1 * dt, tb - dt)
        ref = ref - dt / 2 * (v1 + v2)
    assert _close(out, ref, 1e-12)
    assert len(calls) == 2 * n and calls[-1] == 0.0  # 2N evaluations, the last at t = 0
    # The EDM variant differs exactly by its Euler last step: one call fewer, another result.
    edm_calls: list[float] = []
    edm = SAMPLERS["heun_edm"](_stand_in(edm_calls), x, make_timesteps(n))
    assert len(edm_calls) == 2 * n - 1 and min(edm_calls) > 0 and not _close(edm, out, 1e-6)


def test_source_euler_stochastic_rule_by_hand():
    """Source: sigma(t) = t(1-t)/(1-t+0.008) at the current t; x <- x - v·dt + sigma·z·sqrt(dt), z from generator."""
    n, x = 8, torch.randn(2, 3, 4, generator=_gen(12), dtype=torch.float64)
    out = euler_stochastic(_stand_in(), x, make_timesteps(n), generator=_gen(13))
    ref, dt, g = x.clone(), 1.0 / n, _gen(13)
    for t in torch.linspace(1, 1 / n, n, dtype=torch.float64).tolist():
        z = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        sigma = t * (1 - t) / (1 - t + 0.008)
        ref = ref - _stand_in()(ref, torch.full((2,), t, dtype=torch.float64)) * dt + sigma * z * math.sqrt(dt)
    assert _close(out, ref, 1e-12)
    assert source_sigma(1.0) == 0.0 and source_sigma(0.0) == 0.0
    assert source_sigma(0.5) == pytest.approx(0.25 / 0.508)


def test_samplers_match_a_gaussian_target():
    """Deterministic samplers push N(0, 1) onto N(MU, S²); both Heuns (2nd order) much closer than Euler."""
    # 16384 values: below torch's intra-op grain size, so the test runs single-threaded on a busy machine.
    x = torch.randn(1024, 16, generator=_gen(1), dtype=torch.float64)
    ts = make_timesteps(50)
    outs = {name: SAMPLERS[name](_gaussian_velocity, x, ts) for name in DETERMINISTIC}
    # All are deterministic linear maps here, so the mean error is just the sample mean of x (~0.004).
    for out in outs.values():
        assert out.mean().item() == pytest.approx(MU, abs=0.01)
    err = {name: abs(out.std().item() / S - 1) for name, out in outs.items()}
    assert err["heun"] < 0.01 and err["heun_edm"] < 0.01 < err["euler"] < 0.05


def test_source_euler_stochastic_inflates_the_variance_as_documented():
    """No score correction for its noise: on the Gaussian target the std is ~1.25x too large (its docstring)."""
    g = _gen(2)
    x = torch.randn(1024, 16, generator=g, dtype=torch.float64)
    out = euler_stochastic(_gaussian_velocity, x, make_timesteps(50), generator=g)
    assert abs(out.mean().item() - MU) < 0.02
    assert 1.15 < out.std().item() / S < 1.35
    a = euler_stochastic(_gaussian_velocity, x[:4], make_timesteps(8), generator=_gen(4))
    b = euler_stochastic(_gaussian_velocity, x[:4], make_timesteps(8), generator=_gen(4))
    c = euler_stochastic(_gaussian_velocity, x[:4], make_timesteps(8), generator=_gen(5))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_euler_ancestral_matches_a_gaussian_target_within_sampling_error():
    """The tolerance stated in euler_ancestral's docstring: 200 steps, eta = 1, 16384 values."""
    g = _gen(2)
    x = torch.randn(1024, 16, generator=g, dtype=torch.float64)
    out = euler_ancestral(_gaussian_velocity, x, make_timesteps(200), generator=g, eta=1.0)
    se = S / out.numel() ** 0.5
    assert abs(out.mean().item() - MU) < 5 * se
    assert abs(out.std().item() / S - 1) < 0.05
    # Noise really enters: the result is far from the deterministic path from the same start.
    det = euler(_gaussian_velocity, x, make_timesteps(200))
    assert (out - det).std().item() > 0.2 * S


def test_euler_ancestral_replays_with_a_generator_and_reduces_to_euler():
    x0 = torch.zeros(2, 3, 4, 4)
    field = _gaussian_velocity
    x = torch.randn(2, 3, 4, 4, generator=_gen(3))
    ts = make_timesteps(8)
    a = euler_ancestral(field, x, ts, generator=_gen(4))
    b = euler_ancestral(field, x, ts, generator=_gen(4))
    c = euler_ancestral(field, x, ts, generator=_gen(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert _close(euler_ancestral(field, x, ts, eta=0.0), euler(field, x, ts))
    with pytest.raises(ValueError, match="eta"):
        euler_ancestral(_towards(x0), x, ts, eta=1.5)


def test_make_timesteps_and_shift():
    ts = make_timesteps(4)
    assert ts.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = make_timesteps(4, shift=3.0)
    assert shifted[0].item() == 1.0 and shifted[-1].item() == 0.0
    assert shifted[2].item() == pytest.approx(0.75)  # 3·0.5 / (1 + 2·0.5)
    assert bool((shifted[1:-1] > ts[1:-1]).all())  # more time at high noise
    assert torch.equal(make_timesteps(7, shift=1.0), make_timesteps(7))
    with pytest.raises(ValueError, match="num_steps"):
        make_timesteps(0)


def test_enter_timesteps_for_image_to_image():
    assert enter_timesteps(10, 0.6).tolist() == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    assert torch.equal(enter_timesteps(4, 1.0), make_timesteps(4))
    assert enter_timesteps(4, 0.0).tolist() == [0.0]
    # Between grid points: the first step is the short one, the rest are the full run's.
    assert enter_timesteps(4, 0.6).tolist() == [0.6, 0.5, 0.25, 0.0]
    shifted = enter_timesteps(4, 0.6, shift=3.0)
    assert shifted[0].item() == 0.6 and torch.equal(shifted[1:], make_timesteps(4, 3.0)[3:])
    with pytest.raises(ValueError, match="strength"):
        enter_timesteps(4, 1.5)


def test_samplers_share_one_signature_and_call_back_every_step():
    x0 = torch.ones(2, 4, 4, 4)
    noise = torch.randn(2, 4, 4, 4, generator=_gen(6))
    for name, fn in SAMPLERS.items():
        seen: list[dict] = []
        fn(lambda x, t: noise - x0, noise, make_timesteps(5), generator=_gen(0), callback=seen.append)
        assert [s["i"] for s in seen] == [0, 1, 2, 3, 4], name
        assert seen[-1]["t_next"] == 0.0, name
        if name in DETERMINISTIC:
            assert torch.allclose(seen[-1]["x0"], x0, atol=1e-4), name
        with pytest.raises(ValueError, match="decrease"):
            fn(_towards(x0), noise, torch.tensor([0.0, 0.5, 1.0]))


def _cond_model():
    calls = []

    def model_fn(x, t, context, pooled):
        calls.append(x.shape[0])
        # Depends on x, t and both conditioning tensors (per sample).
        return x * t.view(-1, 1, 1, 1) + context.mean((1, 2)).view(-1, 1, 1, 1) + pooled.sum(1).view(-1, 1, 1, 1)

    return model_fn, calls


def _guidance_inputs(seed: int):
    """x (3, 4, 4, 4), t (3,), a conditioning dict and its all-zero (dropped) counterpart."""
    g = _gen(seed)
    x, t = torch.randn(3, 4, 4, 4, generator=g), torch.rand(3, generator=g)
    cond = {"context": torch.randn(3, 10, 8, generator=g), "pooled": torch.randn(3, 6, generator=g)}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    return x, t, cond, uncond


def test_guidance_scale_zero_is_the_conditional_prediction():
    x, t, cond, uncond = _guidance_inputs(7)
    model_fn, calls = _cond_model()
    v = guided(model_fn, cond, uncond, 0.0)(x, t)
    assert torch.equal(v, model_fn(x, t, **cond))
    assert calls == [3, 3]  # scale 0 runs the conditional forward only


def test_guidance_formula_batched_and_unbatched():
    x, t, cond, uncond = _guidance_inputs(8)
    model_fn, calls = _cond_model()
    v_c, v_u = model_fn(x, t, **cond), model_fn(x, t, **uncond)
    expected = v_c + 5.0 * (v_c - v_u)  # Ho & Salimans guidance weight w = 5
    calls.clear()
    assert _close(guided(model_fn, cond, uncond, 5.0)(x, t), expected)
    assert calls == [6]  # one forward of 2B
    # A negative prompt of another length cannot be concatenated: two forwards, same formula.
    uncond_short = {"context": torch.zeros(3, 4, 8), "pooled": torch.zeros(3, 6)}
    calls.clear()
    assert _close(guided(model_fn, cond, uncond_short, 5.0)(x, t), v_c + 5.0 * (v_c - model_fn(x, t, **uncond_short)))
    assert calls == [3, 3, 3]
    # Guided velocities plug into every sampler.
    out = SAMPLERS["heun"](guided(model_fn, cond, uncond, 2.0), x, make_timesteps(3))
    assert out.shape == x.shape and torch.isfinite(out).all()
