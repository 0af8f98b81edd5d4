"""Live loader:model balance: one line of advice when a run is persistently out of balance, and an end summary.

Fed once per log window (on the logging rank) with what the window measured:
- `stall_pct`: this rank's time waiting for batches / wall time; `stall_pct_max`: the worst model rank's;
- the loader's cumulative timings at the window's start and end (the TIMING_FIELDS seconds every batch header
  carries: decode, gemma, bert, clip, vae, send, wait). From them, over the window's wall time,
    loader busy % = Δ(gemma + bert + clip + vae + send) / wall   (the loader's main thread, encoding and sending)
    loader wait % = Δwait / wall                                  (blocked: its consumers had max_in_flight batches)
  Decoding runs in a worker thread one step ahead, overlapped with the encoders, so it is not busy time of the
  main thread; if decoding were the bottleneck the main thread would be neither busy nor waiting, and busy + wait
  stays well below 100 % — the advice then names decoding.

Advice is given once per run: when the worst stall stays above `stall_limit_pct` for `windows` windows in a row
(the loader is the bottleneck), or the loader waits more than `idle_limit_pct` of the time for as long (it could
feed more model ranks). The ratio loader-time : model-time per batch follows from the same figures: with stall s
the period is P and the model computes (1 - s)·P, the loader is busy b·P.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ENCODE_FIELDS = ("gemma", "bert", "clip", "vae", "send")


def loader_load(start: dict[str, float], end: dict[str, float], wall_s: float) -> tuple[float, float]:
    """(busy %, wait %) of a loader over a window of `wall_s` seconds, from its cumulative timings at both ends."""
    if wall_s <= 0 or not end:
        return 0.0, 0.0
    spent = {k: end.get(k, 0.0) - start.get(k, 0.0) for k in end}
    busy = sum(spent.get(k, 0.0) for k in ENCODE_FIELDS)
    return min(100.0, 100.0 * busy / wall_s), min(100.0, 100.0 * spent.get("wait", 0.0) / wall_s)


@dataclass
class WindowStats:
    """One log window as the monitor sees it."""

    stall_pct: float
    stall_pct_max: float
    loader_busy_pct: float
    loader_wait_pct: float


@dataclass
class BalanceMonitor:
    """Watches the log windows of a run; see the module docstring.

    windows: consecutive out-of-balance windows before advising (the first windows, while the encoders and the
    allocator warm up, are skipped: `skip_windows`). consumers: model ranks per loader in this run's layout.
    """

    consumers: int = 1
    stall_limit_pct: float = 5.0
    idle_limit_pct: float = 50.0
    windows: int = 3
    skip_windows: int = 1
    seen: int = 0
    stalled_in_row: int = 0
    idle_in_row: int = 0
    advice: str | None = None
    history: list[WindowStats] = field(default_factory=list)

    def update(self, stats: WindowStats) -> str | None:
        """Record one window; return the advice line the first time it is due, else None."""
        self.seen += 1
        if self.seen <= self.skip_windows:
            return None
        self.history.append(stats)
        self.stalled_in_row = self.stalled_in_row + 1 if stats.stall_pct_max > self.stall_limit_pct else 0
        self.idle_in_row = self.idle_in_row + 1 if stats.loader_wait_pct > self.idle_limit_pct else 0
        if self.advice is not None:
            return None
        if self.stalled_in_row >= self.windows:
            self.advice = self._loader_bound(self.history[-self.windows:])
        elif self.idle_in_row >= self.windows:
            self.advice = self._model_bound(self.history[-self.windows:])
        return self.advice

    def _loader_bound(self, recent: list[WindowStats]) -> str:
        stall = _mean(s.stall_pct_max for s in recent)
        busy = _mean(s.loader_busy_pct for s in recent)
        ratio = 1.0 / max(1e-9, 1.0 - stall / 100.0)  # period / model compute time
        if busy + _mean(s.loader_wait_pct for s in recent) < 60.0:
            side = (f"the loader's main thread is busy only {busy:.0f} % of the time, so decoding images is the "
                    f"bottleneck: raise data.decode_threads")
        else:
            side = (f"the loaders are the bottleneck: a step takes {ratio:.2f}x the model's compute time (loader busy "
                    f"{busy:.0f} %)")
        fewer = max(1, int(self.consumers / ratio))
        return (f"balance: model ranks stall {stall:.1f} % (worst rank, last {len(recent)} windows); {side}. Feed "
                f"fewer model ranks per loader (~{fewer} instead of {self.consumers}) or add loaders: "
                f"`sd3 plan --config ...` predicts the stall of each layout")

    def _model_bound(self, recent: list[WindowStats]) -> str:
        wait = _mean(s.loader_wait_pct for s in recent)
        more = max(self.consumers + 1, int(self.consumers / max(1e-9, 1.0 - wait / 100.0)))
        return (f"balance: the loaders wait {wait:.0f} % of the time for their model ranks (last {len(recent)} "
                f"windows): the model is the bottleneck and each loader could feed ~{more} model ranks instead of "
                f"{self.consumers}; `sd3 plan --config ...` predicts the stall of each layout")

    def summary(self) -> str:
        """One line for the end of the run."""
        if not self.history:
            return "balance: no log window measured"
        stall = _mean(s.stall_pct_max for s in self.history)
        busy = _mean(s.loader_busy_pct for s in self.history)
        wait = _mean(s.loader_wait_pct for s in self.history)
        verdict = ("loader-bound" if stall > self.stall_limit_pct else
                   "model-bound, loaders underused" if wait > self.idle_limit_pct else "balanced")
        return (f"balance: {verdict} over {len(self.history)} windows: worst-rank stall {stall:.1f} %, "
                f"loader busy {busy:.0f} %, loader wait {wait:.0f} %"
                + ("" if self.advice is None else " (advice given)"))

    def figures(self) -> dict[str, float]:
        """The summary as numbers, for metrics.jsonl."""
        if not self.history:
            return {}
        return {
            "balance_stall_pct_max_mean": _mean(s.stall_pct_max for s in self.history),
            "balance_loader_busy_pct_mean": _mean(s.loader_busy_pct for s in self.history),
            "balance_loader_wait_pct_mean": _mean(s.loader_wait_pct for s in self.history),
        }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
