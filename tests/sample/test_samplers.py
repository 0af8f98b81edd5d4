"""Samplers (sd3/sample/samplers.py) on velocity fields whose solution is known in closed form."""

import pytest
import torch

from sd3.sample.samplers import SAMPLERS, euler, euler_stochastic, guided, make_timesteps


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


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_samplers_reach_a_fixed_x0_exactly(name, shift):
    g = _gen(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    out = SAMPLERS[name](_towards(x0), noise, make_timesteps(10, shift=shift), generator=g)
    assert out.shape == x0.shape
    assert (out - x0).abs().max().item() < 1e-4


def test_samplers_match_a_gaussian_target():
    """Deterministic samplers push N(0, 1) onto N(MU, S²); Heun (2nd order) much closer than Euler."""
    # 16384 values: below torch's intra-op grain size, so the test runs single-threaded on a busy machine.
    x = torch.randn(1024, 16, generator=_gen(1), dtype=torch.float64)
    ts = make_timesteps(50)
    out_euler = SAMPLERS["euler"](_gaussian_velocity, x, ts)
    out_heun = SAMPLERS["heun"](_gaussian_velocity, x, ts)
    # Both are deterministic linear maps here, so the mean error is just the sample mean of x (~0.004).
    for out in (out_euler, out_heun):
        assert out.mean().item() == pytest.approx(MU, abs=0.01)
    heun_err = abs(out_heun.std().item() / S - 1)
    euler_err = abs(out_euler.std().item() / S - 1)
    assert heun_err < 0.01 < euler_err < 0.05


def test_euler_stochastic_matches_a_gaussian_target_within_sampling_error():
    """The tolerance stated in euler_stochastic's docstring: 200 steps, eta = 1, 16384 values."""
    g = _gen(2)
    x = torch.randn(1024, 16, generator=g, dtype=torch.float64)
    out = euler_stochastic(_gaussian_velocity, x, make_timesteps(200), generator=g, eta=1.0)
    se = S / out.numel() ** 0.5
    assert abs(out.mean().item() - MU) < 5 * se
    assert abs(out.std().item() / S - 1) < 0.05
    # Noise really enters: the result is far from the deterministic path from the same start.
    det = euler(_gaussian_velocity, x, make_timesteps(200))
    assert (out - det).std().item() > 0.2 * S


def test_euler_stochastic_replays_with_a_generator_and_reduces_to_euler():
    x0 = torch.zeros(2, 3, 4, 4)
    field = _gaussian_velocity
    x = torch.randn(2, 3, 4, 4, generator=_gen(3))
    ts = make_timesteps(8)
    a = euler_stochastic(field, x, ts, generator=_gen(4))
    b = euler_stochastic(field, x, ts, generator=_gen(4))
    c = euler_stochastic(field, x, ts, generator=_gen(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert _close(euler_stochastic(field, x, ts, eta=0.0), euler(field, x, ts))
    with pytest.raises(ValueError, match="eta"):
        euler_stochastic(_towards(x0), x, ts, eta=1.5)


def test_make_timesteps_and_shift():
    ts = make_timesteps(4)
    assert ts.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    shifted = make_timesteps(4, shift=3.0)
    assert shifted[0].item() == 1.0 and shifted[-1].item() == 0.0
    assert shifted[2].item() == pytest.approx(0.75)  # 3·0.5 / (1 + 2·0.5)
    assert bool((shifted[1:-1] > ts[1:-1]).all())  # more time at high noise
    with pytest.raises(ValueError, match="num_steps"):
        make_timesteps(0)


def test_samplers_share_one_signature_and_call_back_every_step():
    x0 = torch.ones(2, 4, 4, 4)
    noise = torch.randn(2, 4, 4, 4, generator=_gen(6))
    for name, fn in SAMPLERS.items():
        seen = []
        fn(_towards(x0), noise, make_timesteps(5), generator=_gen(0), callback=lambda info: seen.append(info))
        assert [s["i"] for s in seen] == [0, 1, 2, 3, 4], name
        assert seen[-1]["t_next"] == 0.0 and torch.allclose(seen[-1]["x0"], x0, atol=1e-4), name
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
