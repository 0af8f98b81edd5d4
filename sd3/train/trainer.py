"""The model-rank training loop (ARCHITECTURE §3, §7, §8).

`Trainer.train_step` is one optimizer step, top to bottom: for each of `accumulation_steps` micro-batches,
take the (prefetched) batch and backpropagate its training loss (sd3/train/flow.py: CFG dropout, t and noise,
prediction under autocast; DDP all-reduces only on the last micro-batch); then clip, agree across model ranks
on "finite?" and "stop?" with one small all_reduce, step AdamW and the LR schedule, update the EMA.
`Trainer.train` runs steps, reports, checkpoints and stops. The parts live beside it: `parallelize` (DDP,
compile), `Checkpointer` (save / resume of the components), `TrainState` (position, counters, RNG),
`MetricsReporter` (windows, collectives at log steps, the sinks, the loader:model balance). An optional
`StepHook` (the Validator of sd3/eval, built by sd3/commands/train.py on model rank 0) runs after each report.

Randomness: the noise, timesteps and CFG masks of micro-batch k on model rank r come from a generator on the
model's device seeded by (seed, "train", k, r) — never from a global RNG — and the data of micro-batch k is
sampler step k of this rank's loader. A run resumed from a checkpoint at step S replays what the uninterrupted
run did.

Host syncs: one per step (`.item()` of the shared "skip / stop" decision, which the host needs to branch on);
the loss and gradient norm stay on the device until a log step reads them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from sd3.config import Config
from sd3.distributed import signals
from sd3.model import build_model
from sd3.seeds import generator, stream_seed
from sd3.train.checkpointer import Checkpointer, ResumePlan
from sd3.train.ema import EMA
from sd3.train.flow import training_loss
from sd3.train.fsdp import ModelState, OptimizerState
from sd3.train.logging import RunLogger, new_run_id
from sd3.train.parallel import ModelRanks, clip_grad_norm, gradient_sync, parallelize, sharded
from sd3.train.reporter import MetricsReporter
from sd3.train.schedule import build_scheduler
from sd3.train.sources import BatchSource
from sd3.train.state import TrainState
from sd3.train.step import block_norms, build_optimizer, resolve_precision

__all__ = ["ModelRanks", "NonFiniteError", "StepHook", "StepResult", "Trainer"]


class StepHook(Protocol):
    """Work run on this model rank after a step's report, before its checkpoint: the Validator of
    sd3/eval/validation.py (sd3/train must not import sd3/eval, so the command builds it and hands it in).

    maybe_run decides itself whether `step` is due, logs through `logger`, and returns what it logged or None.
    """

    def maybe_run(self, step: int, model: nn.Module, ema: EMA, logger: RunLogger,
                  autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, Any] | None: ...


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over micro-batches and model ranks, a device scalar (read at log steps)
    grad_norm: torch.Tensor  # before clipping, a device scalar
    lr: float
    skipped: bool  # non-finite: the optimizer did not step
    stop: bool  # some rank was asked to stop: checkpoint and exit after this step


class Trainer:
    """Trains one MMDiT replica on this model rank from `source`.

    cfg: the resolved Config; ranks: device and DDP group; source: the micro-batch stream (sd3/train/sources.py);
    plan: a checkpoint to start from (sd3/train/checkpointer.py), or None for a fresh run; validator: a StepHook
    run after each report (model rank 0 gets the Validator; the other ranks wait at their next collective, or under
    FSDP run a ValidationPeer that joins the gathers of the sharded weights).
    """

    def __init__(self, cfg: Config, ranks: ModelRanks, source: BatchSource, plan: ResumePlan | None = None,
                 validator: StepHook | None = None):
        self.cfg = cfg
        self.ranks = ranks
        self.source = source
        self.validator = validator
        self.device = ranks.device
        tc = cfg.train

        # The same initial weights on every rank (DDP would broadcast rank 0's anyway; this keeps runs comparable).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(tc.seed, "init"))
            self.model = build_model(cfg.model).to(self.device)
        self.precision = resolve_precision(tc.precision, self.device)
        # self.model is what checkpoints, the EMA and clipping see: the plain MMDiT under DDP (self.ddp wraps it),
        # sharded in place under FSDP — so the optimizer and the EMA are built from the sharded parameters, after.
        self.ddp = parallelize(self.model, tc, ranks, self.precision.autocast_dtype)
        self.optimizer = build_optimizer(self.model, tc, self.device)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_scaler)
        self.ema = EMA(self.model, tc.ema_decay, self.device if tc.ema_device == "device" else torch.device("cpu"))
        data_identity = {k: v for k, v in source.sampler.state_dict().items() if k != "step"}
        self.state = TrainState(run_id=new_run_id(), sampler=data_identity)
        self.checkpointer = Checkpointer(
            cfg, {"model": ModelState(self.model), "ema": self.ema,
                  "optimizer": OptimizerState(self.model, self.optimizer), "scheduler": self.scheduler,
                  "scaler": self.scaler, "train": self.state},
            is_main=ranks.is_main, group=ranks.group if ranks.is_ddp else None, sharded=sharded(tc, ranks),
        )
        if plan is not None:
            self.checkpointer.load(plan)
        self.stop_from_source = False  # a loader forwarded a stop signal it received
        self.pending_norms: dict[str, torch.Tensor] = {}  # per-block norms waiting for the next log step

        self.reporter = MetricsReporter(cfg, ranks, source.counts_rows, self.state.step, self.state.run_id)
        self.reporter.info(
            f"training {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters on {ranks.world} model "
            f"rank(s), {self.device}, precision {self.precision.name}, attention {self.model.attention_backend}, "
            f"starting at step {self.state.step} (micro-batch {self.state.micro_step})"
        )

    # ----------------------------------------------------------------------------------------------- the step

    def train_step(self) -> StepResult:
        tc, state = self.cfg.train, self.state
        self.ddp.train()
        loss_total = torch.zeros((), device=self.device)
        for micro in range(tc.accumulation_steps):
            # The batch was requested a step ago (loader in flight / encoder thread); time only the wait for it.
            wait_start = time.perf_counter()
            batch, stats = self.source.next()
            self.note_batch(batch, stats, time.perf_counter() - wait_start)
            batch = batch.to(self.device, torch.float32)

            # This micro-batch's own random stream (CFG masks, timesteps, noise), on the model's device so the
            # draws need no host-to-device copy.
            gen = generator(tc.seed, state.micro_step, self.ranks.rank, "train", device=self.device)
            # DDP / FSDP reduce gradients inside backward; before the last micro-batch only accumulate locally.
            last = micro == tc.accumulation_steps - 1
            with gradient_sync(self.ddp, self.model, last):
                with self.precision.autocast():
                    loss = training_loss(self.ddp, batch, gen, self.cfg) / tc.accumulation_steps
                self.scaler.scale(loss).backward()
            loss_total += loss.detach()
            state.micro_step += 1

        self.scaler.unscale_(self.optimizer)  # a no-op without fp16; clipping must see true gradient sizes
        if tc.grad_norms_every > 0 and (state.step + 1) % tc.grad_norms_every == 0:
            self.pending_norms = block_norms(self.model)  # after unscaling, before clipping; device tensors
        grad_norm = clip_grad_norm(self.model, tc.grad_clip)  # the global norm, also under FSDP
        # fp16: the GradScaler skips steps with inf gradients by itself (it is how it finds its scale); only a
        # non-finite loss counts. Otherwise a non-finite loss or gradient norm means: do not touch the weights.
        finite = torch.isfinite(loss_total)
        if not self.scaler.is_enabled():
            finite = finite & torch.isfinite(grad_norm)
        stop_here = signals.requested() or self.stop_from_source
        # One all_reduce per step carries the loss for the log and the two decisions every rank must share.
        stop_flag = torch.full((), float(stop_here), device=self.device)  # a fill, not a host-to-device copy
        shared = torch.stack([loss_total.float(), (~finite).float(), stop_flag])  # (3,)
        if self.ranks.is_ddp:
            dist.all_reduce(shared, op=dist.ReduceOp.SUM, group=self.ranks.group)
        # The host must branch on the decisions: read both as one integer, the step's only device-to-host sync.
        decision = int(((shared[1] > 0).int() + 2 * (shared[2] > 0).int()).item())
        skipped, stop = bool(decision & 1), bool(decision & 2)
        loss_mean = shared[0] / self.ranks.world  # stays on the device
        lr = self.optimizer.param_groups[0]["lr"]

        if skipped:
            state.nonfinite_steps += 1
            state.nonfinite_in_row += 1
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            state.nonfinite_in_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        # The schedule is a function of the step count, skipped steps included, like the sampler's position.
        self.scheduler.step()
        state.step += 1
        if not skipped and state.step % tc.ema_update_every == 0:
            self.ema.update(self.model)
        if state.nonfinite_in_row >= tc.max_nonfinite:
            raise NonFiniteError(
                f"{state.nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(last at step {state.step}, loss {loss_mean.item()}); stopping "
                f"(train.max_nonfinite={tc.max_nonfinite})"
            )
        return StepResult(loss_mean, grad_norm, lr, skipped, stop)

    def note_batch(self, batch, stats, wait_s: float) -> None:
        """Bookkeeping of one received micro-batch: the reporter's window, images seen, a forwarded stop."""
        self.reporter.note_batch(batch, stats, wait_s)
        self.stop_from_source = self.stop_from_source or stats.stop_requested
        self.state.images += len(batch)

    # ----------------------------------------------------------------------------------------------- the run

    def train(self) -> int:
        """Run to train.total_steps, or until a stop signal (then checkpoint and return signals.PREEMPTED_EXIT_CODE)."""
        tc, state = self.cfg.train, self.state
        try:
            while state.step < tc.total_steps:
                result = self.train_step()
                self.reporter.window.steps += 1
                self.reporter.log.advance()
                if state.step % tc.log_every == 0 or result.stop or state.step == tc.total_steps:
                    self.report(result)
                if self.validator is not None and not result.stop:  # a preempted run spends its grace on saving
                    self.validate()
                if result.stop:
                    self.save()
                    self.reporter.info(
                        f"stop requested ({', '.join(signals.received()) or 'by a peer rank'}): "
                        f"checkpoint at step {state.step} written, exiting"
                    )
                    self.finish()
                    return signals.PREEMPTED_EXIT_CODE
                if state.step % tc.save_every == 0:
                    self.save()
            if self.checkpointer.last_saved != state.step:
                self.save()
            self.finish()
            return 0
        except BaseException as e:
            self.source.fail(f"model rank {self.ranks.rank}: {type(e).__name__}: {e}")
            self.reporter.close()
            raise

    def report(self, result: StepResult) -> None:
        """Log the window since the last report (all model ranks call this: the skip counters are all-reduced)."""
        values = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                  "nonfinite_steps": self.state.nonfinite_steps, **self.pending_norms}
        self.pending_norms = {}
        self.reporter.report(self.state.step, values, self.state.skipped_base)

    def validate(self) -> None:
        """Run the validator if due; its time is left out of the throughput window (it is not training time)."""
        start = time.perf_counter()
        logged = self.validator.maybe_run(self.state.step, self.model, self.ema, self.reporter.log,
                                          self.precision.autocast)
        if logged is not None:
            self.reporter.exclude_time(time.perf_counter() - start)

    def save(self) -> None:
        """Checkpoint the current step: rank 0 writes, every model rank waits until it is on disk."""
        # A collective, so before the rank-0-only part.
        self.state.skipped_total = self.reporter.total_skipped_rows(self.state.skipped_base)
        start = time.perf_counter()
        path = self.checkpointer.save()
        if path is not None:
            self.reporter.info(f"checkpoint {path} ({time.perf_counter() - start:.1f} s)")

    def finish(self) -> None:
        """Release the data source (loaders stop after the last consumed step). The last save's barrier already
        made every model rank wait for rank 0's checkpoint."""
        self.source.stop(self.state.micro_step)
        self.reporter.summarize_balance(self.state.step)
        self.reporter.close()
