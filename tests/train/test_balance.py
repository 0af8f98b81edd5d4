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
