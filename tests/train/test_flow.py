"""Rectified-flow math (sd3/train/flow.py) against stand-in models and closed-form statistics."""

import math

import pytest
import torch

from sd3.train.flow import add_noise, cfg_dropout, flow_loss, sample_timesteps, velocity_target


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_loss_is_zero_for_the_exact_velocity_and_positive_otherwise():
    g = _gen(0)
    x0 = torch.randn(8, 4, 8, 6, generator=g)  # (B, C, h, w), non-square
    noise = torch.randn(8, 4, 8, 6, generator=g)
    t = sample_timesteps(8, g)
    x_t = add_noise(x0, noise, t)

    def exact_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # Knows the data point: the straight path through x_t that starts at x0 has velocity (x_t - x0) / t.
        return (x - x0) / t.view(-1, 1, 1, 1)

    target = velocity_target(x0, noise)
    assert flow_loss(exact_model(x_t, t), target).item() < 1e-10
    # The endpoints of the path: t=0 is data, t=1 is noise.
    assert torch.equal(add_noise(x0, noise, torch.zeros(8)), x0)
    assert torch.equal(add_noise(x0, noise, torch.ones(8)), noise)
    # A model that predicts the opposite velocity pays 4·E[v²].
    wrong = flow_loss(-target, target).item()
    assert wrong == pytest.approx(4 * target.pow(2).mean().item(), rel=1e-5)


def test_loss_is_fp32_mean_squared_error():
    pred = torch.randn(3, 4, 2, 2, dtype=torch.bfloat16)
    target = torch.randn(3, 4, 2, 2)
    loss = flow_loss(pred, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx((pred.float() - target).pow(2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        flow_loss(pred, target[:2])


def test_empty_batch_gives_zero_loss_that_backpropagates():
    w = torch.nn.Parameter(torch.ones(4, 1, 1))
    x = torch.randn(0, 4, 8, 8)
    loss = flow_loss(x * w, torch.zeros(0, 4, 8, 8))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))


def test_logit_normal_timestep_statistics_and_replay():
    n = 30_000  # below torch's intra-op grain size: single-threaded, fast on a busy machine
    t = sample_timesteps(n, _gen(1))
    assert t.shape == (n,) and t.dtype == torch.float32
    assert bool((t > 0).all() and (t < 1).all())
    logit = torch.log(t) - torch.log1p(-t)
    # logit(t) ~ N(0, 1): mean within ~5 standard errors (1/sqrt(n) = 0.0058), std within 2% (SE 0.4%).
    assert abs(logit.mean().item()) < 0.03
    assert logit.std().item() == pytest.approx(1.0, abs=0.02)
    assert t.median().item() == pytest.approx(0.5, abs=0.01)
    # P(t < sigmoid(1)) = Phi(1) = 0.8413
    assert (t < 1 / (1 + math.exp(-1))).float().mean().item() == pytest.approx(0.8413, abs=0.01)
    assert torch.equal(sample_timesteps(1000, _gen(5)), sample_timesteps(1000, _gen(5)))
    assert not torch.equal(sample_timesteps(1000, _gen(5)), sample_timesteps(1000, _gen(6)))
    shifted = sample_timesteps(n, _gen(2), mean=0.5, std=0.5)
    logit = torch.log(shifted) - torch.log1p(-shifted)
    assert logit.mean().item() == pytest.approx(0.5, abs=0.015)
    assert logit.std().item() == pytest.approx(0.5, abs=0.01)


def _condition(b: int, t: int, d: int, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(3)
    # Strictly non-zero entries, so "zeroed" can only come from the dropout.
    context = torch.rand(b, 2 * t, d, generator=g) + 0.5  # (B, 2T, D)
    pooled = torch.rand(b, p, generator=g) + 0.5  # (B, P)
    return context, pooled


def test_cfg_dropout_rates_and_exact_token_ranges():
    b, tt, d, p = 20_000, 3, 2, 2
    context, pooled = _condition(b, tt, d, p)
    ctx_before, pooled_before = context.clone(), pooled.clone()
    out_ctx, out_pooled = cfg_dropout(context, pooled, tt, 0.1, 0.316, 0.2, _gen(4))
    assert torch.equal(context, ctx_before) and torch.equal(pooled, pooled_before)  # inputs untouched

    def part_state(part: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        zero = (part == 0).flatten(1).all(1)
        kept = (part == original).flatten(1).all(1)
        assert bool((zero ^ kept).all()), "a part was partly zeroed"
        return zero  # (B,) bool

    drop_pooled = part_state(out_pooled, pooled)
    drop_gemma = part_state(out_ctx[:, :tt], context[:, :tt])
    drop_bert = part_state(out_ctx[:, tt:], context[:, tt:])

    def within(rate: torch.Tensor, p_: float) -> None:
        se = math.sqrt(p_ * (1 - p_) / b)
        assert abs(rate.float().mean().item() - p_) < 4.5 * se

    within(drop_pooled, 0.1)
    within(drop_gemma, 0.316)
    within(drop_bert, 0.2)
    within(drop_gemma & drop_bert, 0.316 * 0.2)  # independent draws
    within(drop_pooled & drop_gemma & drop_bert, 0.1 * 0.316 * 0.2)


def test_cfg_dropout_replays_and_handles_edge_probabilities():
    context, pooled = _condition(64, 4, 8, 6)
    a = cfg_dropout(context, pooled, 4, 0.3, 0.3, 0.3, _gen(7))
    b = cfg_dropout(context, pooled, 4, 0.3, 0.3, 0.3, _gen(7))
    c = cfg_dropout(context, pooled, 4, 0.3, 0.3, 0.3, _gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    none = cfg_dropout(context, pooled, 4, 0.0, 0.0, 0.0, _gen(7))
    assert torch.equal(none[0], context) and torch.equal(none[1], pooled)
    every = cfg_dropout(context, pooled, 4, 1.0, 1.0, 1.0, _gen(7))
    assert not every[0].any() and not every[1].any()
    # Only the BERT half: the Gemma tokens stay, the BERT tokens go.
    bert_only = cfg_dropout(context, pooled, 4, 0.0, 0.0, 1.0, _gen(7))
    assert torch.equal(bert_only[0][:, :4], context[:, :4]) and not bert_only[0][:, 4:].any()
    # The stream advances by the same amount whatever the probabilities (replay after a config change).
    g1, g2 = _gen(9), _gen(9)
    cfg_dropout(context, pooled, 4, 0.0, 0.0, 0.0, g1)
    cfg_dropout(context, pooled, 4, 0.5, 0.9, 0.1, g2)
    assert torch.equal(g1.get_state(), g2.get_state())
    empty = cfg_dropout(context[:0], pooled[:0], 4, 0.5, 0.5, 0.5, _gen(7))
    assert empty[0].shape == (0, 8, 8) and empty[1].shape == (0, 6)


def test_cfg_dropout_rejects_bad_input():
    context, pooled = _condition(2, 4, 8, 6)
    with pytest.raises(ValueError, match="2\\*text_tokens=10"):
        cfg_dropout(context, pooled, 5, 0.1, 0.1, 0.1, _gen(0))
    with pytest.raises(ValueError, match="p_gemma"):
        cfg_dropout(context, pooled, 4, 0.1, 1.5, 0.1, _gen(0))
    with pytest.raises(ValueError, match="pooled batch"):
        cfg_dropout(context, pooled[:1], 4, 0.1, 0.1, 0.1, _gen(0))
