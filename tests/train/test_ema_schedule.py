"""EMA (sd3/train/ema.py) and the LR schedule (sd3/train/schedule.py)."""

import io
import math

import pytest
import torch
from torch import nn

from sd3.config import TrainConfig
from sd3.train.ema import EMA
from sd3.train.schedule import build_scheduler, lr_factor


def _net(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm brings float buffers (running stats) and an int64 one (num_batches_tracked).
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(dtype)


def _perturb(net: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        net[1].running_mean.add_(1.0)
        net[1].num_batches_tracked.add_(3)


def test_ema_follows_the_decay_formula_and_copies_buffers():
    net = _net()
    ema = EMA(net, decay=0.9, device="cpu")
    p0 = {k: v.clone() for k, v in net.state_dict().items()}
    assert all(torch.equal(ema.state_dict()[k], p0[k]) for k in p0)
    _perturb(net, 1)
    ema.update(net)
    p1 = {k: v.clone() for k, v in net.state_dict().items()}
    _perturb(net, 2)
    ema.update(net)
    p2 = net.state_dict()
    for name, _ in net.named_parameters():
        expected = 0.9 * (0.9 * p0[name] + 0.1 * p1[name]) + 0.1 * p2[name]
        assert (ema.state_dict()[name] - expected).abs().max().item() < 1e-6, name
        assert not torch.equal(ema.state_dict()[name], p2[name])
    # Buffers are copies of the latest values, not averages.
    assert torch.equal(ema.state_dict()["1.running_mean"], p2["1.running_mean"])
    assert ema.state_dict()["1.num_batches_tracked"].item() == 6
    assert ema.state_dict()["1.num_batches_tracked"].dtype == torch.int64


def test_ema_is_fp32_for_a_bf16_model_and_round_trips():
    net = _net(torch.bfloat16)
    ema = EMA(net, decay=0.99, device=torch.device("cpu"))
    assert ema.state_dict()["0.weight"].dtype == torch.float32
    _perturb(net, 3)
    ema.update(net)
    state = ema.state_dict()
    assert state.keys() == net.state_dict().keys()

    other = EMA(_net(torch.bfloat16), decay=0.99)
    other.load_state_dict(state)
    assert all(torch.equal(other.state_dict()[k], state[k]) for k in state)

    target = _net(torch.bfloat16)
    other.copy_to(target)
    assert target[0].weight.dtype == torch.bfloat16
    assert torch.equal(target[0].weight, state["0.weight"].to(torch.bfloat16))

    with pytest.raises(KeyError, match="keys differ"):
        other.load_state_dict({k: v for k, v in state.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="decay"):
        EMA(net, decay=1.0)


def _scheduler(**kw):
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1e-3)
    return opt, build_scheduler(opt, TrainConfig(**kw))


def _lrs(opt, sched, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_warmup_then_constant():
    opt, sched = _scheduler(lr=1e-3, warmup_steps=10, total_steps=100, lr_schedule="constant")
    lrs = _lrs(opt, sched, 150)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.5e-3)
    assert lrs[9] == pytest.approx(0.9e-3)
    assert lrs[10] == pytest.approx(1e-3) and lrs[149] == pytest.approx(1e-3)


def test_linear_warmup_then_cosine_to_zero():
    opt, sched = _scheduler(lr=1e-3, warmup_steps=10, total_steps=110, lr_schedule="cosine")
    lrs = _lrs(opt, sched, 130)
    assert lrs[0] == 0.0 and lrs[10] == pytest.approx(1e-3)
    assert lrs[60] == pytest.approx(0.5e-3)
    assert lrs[35] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lrs[110] == pytest.approx(0.0, abs=1e-12) and lrs[129] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111], strict=True))  # each step against the next
    assert lr_factor(0, 0, 10, "cosine") == 1.0  # no warm-up: full lr at once


def test_warmup_stable_decay_holds_the_lr_then_decays_linearly_over_the_last_fraction():
    opt, sched = _scheduler(lr=1e-3, warmup_steps=10, total_steps=100, lr_schedule="wsd", lr_decay_fraction=0.3)
    lrs = _lrs(opt, sched, 110)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5e-3)
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:71])  # stable until the last 30 steps
    assert lrs[85] == pytest.approx(1e-3 * 15 / 30) and lrs[99] == pytest.approx(1e-3 / 30)
    assert lrs[100] == 0.0 and lrs[109] == 0.0
    assert all(a > b for a, b in zip(lrs[70:100], lrs[71:101], strict=True))  # strictly down to 0
    with pytest.raises(ValueError, match="train.lr_decay_fraction"):
        _scheduler(lr_schedule="wsd", lr_decay_fraction=0.0)


def test_scheduler_state_resumes_under_weights_only_and_takes_the_new_shape():
    opt, sched = _scheduler(lr=1e-3, warmup_steps=10, total_steps=110, lr_schedule="cosine")
    full = _lrs(opt, sched, 40)
    opt2, sched2 = _scheduler(lr=1e-3, warmup_steps=10, total_steps=110, lr_schedule="cosine")
    _lrs(opt2, sched2, 25)
    buf = io.BytesIO()
    torch.save({"optimizer": opt2.state_dict(), "scheduler": sched2.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    opt3, sched3 = _scheduler(lr=1e-3, warmup_steps=10, total_steps=110, lr_schedule="cosine")
    opt3.load_state_dict(state["optimizer"])
    sched3.load_state_dict(state["scheduler"])
    assert _lrs(opt3, sched3, 15) == full[25:40]
    # The schedule's shape comes from the config of the resumed run: a longer total decays more slowly.
    # (The first step still runs at the lr saved in the optimizer state; the next one follows the new shape.)
    opt4, sched4 = _scheduler(lr=1e-3, warmup_steps=10, total_steps=1010, lr_schedule="cosine")
    opt4.load_state_dict(state["optimizer"])
    sched4.load_state_dict(state["scheduler"])
    lrs = _lrs(opt4, sched4, 2)
    assert lrs[0] == full[25]
    assert lrs[1] == pytest.approx(1e-3 * lr_factor(26, 10, 1010, "cosine"))


def test_bad_schedule_name_is_a_clear_error():
    with pytest.raises(ValueError, match="train.lr_schedule"):
        _scheduler(lr_schedule="linear")


def test_gpu_ready_ema_lives_on_the_model_device_and_updates_with_one_foreach_lerp(monkeypatch):
    from sd3.config import TrainConfig
    from sd3.train.ema import EMA

    assert TrainConfig().ema_device == "device"
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    ema = EMA(model, 0.9, device="cpu")  # the model's device here
    expected = {k: 0.9 * v + 0.1 * (v + 1) for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    ema.update(model)
    assert calls == [4]  # one fused call over all four parameters, no per-tensor loop
    assert all(torch.allclose(ema.state_dict()[k], expected[k]) for k in expected)
