"""The metrics reporter of a model rank: per-batch bookkeeping, the log-step aggregation over model ranks, the sinks.

Between log steps nothing here touches the device: throughput and skip counts are host numbers the sources
report, and the step's loss / gradient norm stay device tensors until `report` reads them (one host sync per
log step instead of two per step).

Each log window also feeds the BalanceMonitor (sd3/train/balance.py): the worst rank's stall and the loader's busy /
wait share of the window (loader_busy_pct, loader_wait_pct). Its advice, when a run is persistently out of balance,
is printed once and logged as `balance_advice`; its summary closes the run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sd3.batch import Batch
from sd3.config import LOADER_MODES, Config
from sd3.data.batches import SKIP_REASONS
from sd3.model.flops import train_flops_per_image
from sd3.train.balance import BalanceMonitor, WindowStats, loader_load
from sd3.train.logging import RunLogger
from sd3.train.metrics import Window, peak_flops
from sd3.train.parallel import ModelRanks
from sd3.train.secrets import scrub_secrets
from sd3.train.sources import SourceStats

# Reasons a row can be skipped, as a fixed vocabulary: the RowLoader's, the cache's, and anything else a source
# reports (folded into "other" so no count is lost).
SKIP_VOCABULARY = (*SKIP_REASONS, "other")  # SKIP_REASONS includes the caches' not_cached


def skip_vector(counts: dict[str, int]) -> list[int]:
    known = [int(counts.get(r, 0)) for r in SKIP_VOCABULARY[:-1]]
    other = sum(int(v) for k, v in counts.items() if k not in SKIP_VOCABULARY[:-1])
    return [*known, other]


class MetricsReporter:
    """Collects what one model rank measures and, at log steps, writes the window's figures (rank 0 only).

    cfg: the run's Config; ranks: this rank's place among the model ranks; counts_rows: whether this rank's
    source adds its loader's skip counts to the totals (only a loader's first consumer does); start_step and
    run_id: where the progress bar starts and the wandb run.
    """

    def __init__(self, cfg: Config, ranks: ModelRanks, counts_rows: bool, start_step: int, run_id: str):
        tc = cfg.train
        self.cfg = cfg
        self.ranks = ranks
        self.counts_rows = counts_rows
        self.peak = peak_flops(ranks.device)
        self.window = Window()
        # Model ranks per loader: in colocated / cached mode every rank is its own loader.
        consumers = cfg.topology.models_per_loader if cfg.topology.mode in LOADER_MODES else 1
        self.balance = BalanceMonitor(consumers=consumers)
        self.skipped_rows: dict[str, int] = {}  # latest cumulative counts of this process's source
        save_dir = Path(tc.save_dir)
        self.rows_file = None
        if tc.record_rows:
            (save_dir / "rows").mkdir(parents=True, exist_ok=True)
            self.rows_file = (save_dir / "rows" / f"rank{ranks.rank}.txt").open("a")
        self.log = RunLogger(
            enabled=ranks.is_main, out_dir=save_dir, total_steps=tc.total_steps, start_step=start_step,
            wandb_project=tc.wandb_project, wandb_mode=tc.wandb_mode, run_id=run_id,
            config=scrub_secrets(cfg.to_dict())[0],  # belt and braces: a Config holds no secrets by design
        )

    def note_batch(self, batch: Batch, stats: SourceStats, wait_s: float) -> None:
        """Bookkeeping of one received micro-batch (host values only): throughput window, skips, the row audit."""
        b = len(batch)
        h, w = batch.latents.shape[-2:]
        m = self.cfg.model
        tokens = (h // m.patch_size) * (w // m.patch_size) * b
        flops = train_flops_per_image(m, h * m.vae_downsample, w * m.vae_downsample) * b if b else 0.0
        self.window.add_batch(b, tokens, flops, wait_s)
        self.window.add_loader_timings(stats.timings, stats.peak_memory_bytes)
        self.skipped_rows = dict(stats.skipped)
        if self.rows_file is not None:
            self.rows_file.write(f"{stats.step} " + " ".join(str(int(r)) for r in batch.row_ids.tolist()) + "\n")

    def report(self, step: int, values: dict[str, Any], skipped_base: dict[str, int]) -> dict[str, int]:
        """Log the window since the last report; returns the all-loader skip totals. A collective: every model
        rank calls it at the same step. Tensors in `values` (loss, grad_norm) are read here, the one sync."""
        values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
        wall_s = time.perf_counter() - self.window.start
        values.update(self.window.report(self.peak))
        # rank 0's own stall can hide a slow rank; every loader's memory counts, not only rank 0's loader's
        values["stall_pct_max"], peak_bytes = self.max_over_ranks(values["stall_pct"],
                                                                  self.window.loader_peak_memory_bytes)
        if peak_bytes > 0:  # a source with encoders (loader, colocated); a cache has none
            values["loader_peak_memory_gb"] = peak_bytes / 2**30
        busy, wait = loader_load(self.window.loader_start, self.window.loader_now, wall_s)
        values["loader_busy_pct"], values["loader_wait_pct"] = busy, wait
        advice = self.balance.update(WindowStats(values["stall_pct"], values["stall_pct_max"], busy, wait))
        if advice is not None:  # returned once per run
            values["balance_advice"] = advice
            self.info(advice)
        totals = self.total_skipped_rows(skipped_base)
        for reason, count in totals.items():
            values[f"skipped_{reason}"] = count
        self.log.log(step, values)
        # The loader's timings are cumulative: the next window starts from this window's last reading.
        self.window = Window(loader_start=dict(self.window.loader_now))
        return totals

    def max_over_ranks(self, *values: float) -> list[float]:
        """The largest of each of `values` over the model ranks, in one collective (like total_skipped_rows)."""
        if not self.ranks.is_ddp:
            return list(values)
        maxima = torch.tensor(values, dtype=torch.float64, device=self.ranks.device)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=self.ranks.group)
        return maxima.tolist()

    def total_skipped_rows(self, base: dict[str, int]) -> dict[str, int]:
        """Rows skipped as bad, per reason, summed over loaders (checkpointed `base` + this process's sources).

        A collective. In loader mode every consumer of a loader sees that loader's counts, so only its first
        consumer contributes (counts_rows); colocated and cached ranks are each their own loader. The vector has a
        fixed vocabulary so every rank sends the same shape.
        """
        mine = self.skipped_rows if self.counts_rows else {}
        values = torch.tensor([float(v) for v in skip_vector(mine)], dtype=torch.float64)
        if self.ranks.is_ddp:
            values = values.to(self.ranks.device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.ranks.group)
        return {r: int(base.get(r, 0) + v) for r, v in zip(SKIP_VOCABULARY, values.tolist(), strict=True)}

    def exclude_time(self, seconds: float) -> None:
        """Leave `seconds` of non-training work (validation) out of the current window's wall time."""
        self.window.start += seconds

    def summarize_balance(self, step: int) -> None:
        """The BalanceMonitor's end-of-run line, and its figures in <save_dir>/balance.json (and wandb's summary)."""
        self.info(self.balance.summary())
        figures = self.balance.figures()
        if figures:
            self.log.summary("balance", {"step": step, **figures})

    def info(self, message: str) -> None:
        self.log.info(message)

    def close(self) -> None:
        if self.rows_file is not None:
            self.rows_file.close()
            self.rows_file = None
        self.log.close()
