"""BalanceMonitor: advice once for a loader-bound or an idle-loader run, nothing for a balanced one, a summary."""

from __future__ import annotations

import pytest

from sd3.train.balance import BalanceMonitor, WindowStats, loader_load


def test_loader_load_from_cumulative_timings():
    start = {"decode": 1.0, "gemma": 1.0, "bert": 0.5, "clip": 0.1, "vae": 2.0, "send": 0.1, "wait": 0.0}
    end = {"decode": 3.0, "gemma": 3.0, "bert": 1.0, "clip": 0.2, "vae": 6.0, "send": 0.3, "wait": 1.5}
    busy, wait = loader_load(start, end, wall_s=10.0)
    assert busy == pytest.approx(100 * (2 + 0.5 + 0.1 + 4 + 0.2) / 10)  # decode overlaps: not main-thread time
    assert wait == pytest.approx(15.0)
    assert loader_load({}, {}, 10.0) == (0.0, 0.0)


def test_loader_bound_windows_give_one_advice_line():
    monitor = BalanceMonitor(consumers=2)
    stalled = WindowStats(stall_pct=40.0, stall_pct_max=45.0, loader_busy_pct=97.0, loader_wait_pct=0.0)
    lines = [monitor.update(stalled) for _ in range(6)]
    advice = [line for line in lines if line]
    assert len(advice) == 1 and lines.index(advice[0]) == 3  # 1 warm-up window skipped, then 3 in a row
    assert "stall 45.0 %" in advice[0] and "loaders are the bottleneck" in advice[0] and "sd3 plan" in advice[0]
    assert "1.82x" in advice[0]
    assert monitor.summary().startswith("balance: loader-bound over 5 windows")


def test_a_stall_that_does_not_persist_gives_no_advice():
    monitor = BalanceMonitor(consumers=2)
    for stall in (30, 30, 1, 30, 30, 1, 30, 30):
        assert monitor.update(WindowStats(stall, stall, 80.0, 10.0)) is None
    assert monitor.advice is None


def test_idle_loader_suggests_more_model_ranks():
    monitor = BalanceMonitor(consumers=2, skip_windows=0)
    lines = [monitor.update(WindowStats(0.5, 1.0, 30.0, 70.0)) for _ in range(3)]
    assert lines[:2] == [None, None] and "could feed ~6 model ranks instead of 2" in lines[2]
    assert "model-bound" in monitor.summary()


def test_slow_decoding_is_named():
    monitor = BalanceMonitor(consumers=2, skip_windows=0)
    line = [monitor.update(WindowStats(30.0, 30.0, 20.0, 0.0)) for _ in range(3)][-1]
    assert "decoding images is the bottleneck" in line and "data.decode_threads" in line


def test_balanced_run_summary():
    monitor = BalanceMonitor(consumers=3)
    for _ in range(5):
        assert monitor.update(WindowStats(1.0, 2.0, 80.0, 15.0)) is None
    assert monitor.summary().startswith("balance: balanced over 4 windows")
    assert monitor.figures()["balance_stall_pct_max_mean"] == pytest.approx(2.0)


def test_a_loader_bound_run_prints_the_advice_once(tiny_models, shapes_phase, tmp_path, monkeypatch, capsys):
    """A real colocated run whose VAE encoding is slowed on purpose: the Trainer's reporter feeds the monitor each
    window, prints the advice once, logs it and the loader's busy / wait shares, and closes with the summary."""
    import json
    import time

    import torch
    from fixtures.training import train_overrides

    from sd3.config_loader import load_config
    from sd3.encoders.vae import LatentVAE
    from sd3.train.sources import ColocatedSource
    from sd3.train.trainer import ModelRanks, Trainer

    encode = LatentVAE.encode

    def slow_encode(self, *args, **kwargs):  # inside the Conditioner's timed "vae" block: loader busy time
        time.sleep(0.6)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(LatentVAE, "encode", slow_encode)
    cfg = load_config("tiny-cpu", train_overrides(tiny_models, shapes_phase, tmp_path, "--topology.mode=colocated",
                                                  "--train.total_steps=6", "--train.save_every=100"))
    device = torch.device("cpu")
    assert Trainer(cfg, ModelRanks(device), ColocatedSource(cfg, 0, 1, device, 0)).train() == 0

    out = capsys.readouterr().out
    assert out.count("balance: model ranks stall") == 1 and "the loaders are the bottleneck" in out
    assert "balance: loader-bound over 5 windows" in out  # the end summary: window 1 is the warm-up
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    advice = [r for r in records if "balance_advice" in r]
    assert [r["step"] for r in advice] == [4] and advice[0]["balance_advice"] in out
    steps = [r for r in records if "loss" in r]
    assert all(r["loader_busy_pct"] > 40 and r["loader_wait_pct"] == 0 for r in steps[1:])
    assert all("loss" in r for r in records)  # metrics.jsonl: one record per logged step
    summary = json.loads((tmp_path / "balance.json").read_text())  # the end-of-run figures
    assert summary["step"] == 6 and summary["balance_stall_pct_max_mean"] > 5
    assert "balance_loader_busy_pct_mean" in summary
