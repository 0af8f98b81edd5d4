"""The model-rank training loop (ARCHITECTURE §3, §7, §8).

`Trainer.train_step` is one optimizer step, top to bottom: for each of `accumulation_steps` micro-batches,
take the (prefetched) batch, drop conditioning for CFG, draw timesteps and noise, predict the velocity under
autocast and backpropagate (DDP all-reduces only on the last micro-batch); then clip, agree across model
ranks on "finite?" and "stop?" with one small all_reduce, step AdamW and the LR schedule, update the EMA.
`Trainer.train` runs steps, logs, checkpoints and stops.

Randomness: the noise, timesteps and CFG masks of micro-batch k on model rank r come from a generator seeded
by (seed, k, r) — never from a global RNG — and the data of micro-batch k is sampler step k of this rank's
loader. A run resumed from a checkpoint at step S therefore replays exactly what the uninterrupted run did.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sd3.config import Config
from sd3.data.batches import SKIP_REASONS
from sd3.data.cached import SKIP_NOT_CACHED
from sd3.distributed import signals
from sd3.model import build_model
from sd3.model.flops import train_flops_per_image
from sd3.train.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint, scrub_secrets
from sd3.train.ema import EMA
from sd3.train.flow import add_noise, cfg_dropout, flow_loss, sample_timesteps, velocity_target
from sd3.train.logging import RunLogger, new_run_id
from sd3.train.metrics import Window, peak_flops
from sd3.train.schedule import build_scheduler
from sd3.train.sources import BatchSource
from sd3.train.step import build_optimizer, generator, resolve_precision, stream_seed

# Reasons a row can be skipped, as a fixed vocabulary: the RowLoader's, the cache's, and anything else a source
# reports (folded into "other" so no count is lost).
SKIP_VOCABULARY = (*SKIP_REASONS, SKIP_NOT_CACHED, "other")


def skip_vector(counts: dict[str, int]) -> list[int]:
    known = [int(counts.get(r, 0)) for r in SKIP_VOCABULARY[:-1]]
    other = sum(int(v) for k, v in counts.items() if k not in SKIP_VOCABULARY[:-1])
    return [*known, other]


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


@dataclass
class ModelRanks:
    """Where this process sits among the ranks that train.

    device: where the MMDiT lives; group: the model ranks' process group (None when training alone, no DDP);
    rank / world: this rank's index in that group and its size.
    """

    device: torch.device
    group: Any = None
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Resume:
    """A checkpoint to start from. exact=True restores the optimizer, schedule, step and data position too;
    exact=False (reset_optim) keeps only the weights and the EMA and starts a new stage at step 0."""

    directory: Path
    loaded: Any  # sd3.train.checkpoint.Loaded
    exact: bool
    keep_wandb_id: bool


@dataclass
class StepResult:
    loss: float  # mean over micro-batches and model ranks
    grad_norm: float  # before clipping
    lr: float
    skipped: bool  # non-finite: the optimizer did not step
    stop: bool  # some rank was asked to stop: checkpoint and exit after this step


@dataclass
class Counters:
    """Run totals that survive resume (saved in state.pt)."""

    images: int = 0  # images trained on by this model rank
    nonfinite_steps: int = 0
    nonfinite_in_row: int = 0
    skipped_rows: dict[str, int] = field(default_factory=dict)  # by reason, all loaders, at the last checkpoint


class Trainer:
    """Trains one MMDiT replica on this model rank from `source`.

    cfg: the resolved Config; ranks: device and DDP group; source: the micro-batch stream (sd3/train/sources.py);
    resume: a checkpoint to start from, or None for a fresh run.
    """

    def __init__(self, cfg: Config, ranks: ModelRanks, source: BatchSource, resume: Resume | None = None):
        self.cfg = cfg
        self.ranks = ranks
        self.source = source
        self.device = ranks.device
        tc = cfg.train

        # The same initial weights on every rank (DDP would broadcast rank 0's anyway; this keeps runs comparable).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(tc.seed, "init"))
            self.model = build_model(cfg.model).to(self.device)
        self.precision = resolve_precision(tc.precision, self.device)
        self.optimizer = build_optimizer(self.model, tc)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_scaler)
        self.ema_device = self.device if tc.ema_device == "device" else torch.device("cpu")
        self.ema = EMA(self.model, tc.ema_decay, self.ema_device)

        self.step = 0  # optimizer steps done
        self.micro_step = 0  # micro-batches consumed = sampler steps of this rank's loader
        self.counters = Counters()
        self.run_id = new_run_id()
        self.last_saved = -1
        self.stop_from_source = False  # a loader forwarded a stop signal it received
        self.skipped_rows: dict[str, int] = {}  # latest cumulative counts of this process's source
        if resume is not None:
            self.restore(resume)

        # DDP and compile are applied from outside; self.model stays the plain MMDiT (checkpoints, EMA, clipping).
        self.ddp: nn.Module = self.model
        self.is_ddp = ranks.group is not None and ranks.world > 1
        if self.is_ddp:
            self.ddp = DistributedDataParallel(self.model, process_group=ranks.group, broadcast_buffers=False)
        if tc.compile:
            self.ddp = torch.compile(self.ddp)

        self.save_dir = Path(tc.save_dir)
        self.peak = peak_flops(self.device)
        self.window = Window()
        self.rows_file = None
        if tc.record_rows:
            rows_dir = self.save_dir / "rows"
            rows_dir.mkdir(parents=True, exist_ok=True)
            self.rows_file = (rows_dir / f"rank{ranks.rank}.txt").open("a")
        self.log = RunLogger(
            enabled=ranks.is_main, out_dir=self.save_dir, total_steps=tc.total_steps, start_step=self.step,
            wandb_project=tc.wandb_project, wandb_mode=tc.wandb_mode, run_id=self.run_id,
            config=scrub_secrets(cfg.to_dict())[0],  # belt and braces: a Config holds no secrets by design
        )
        self.log.info(
            f"training {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters on {ranks.world} model "
            f"rank(s), {self.device}, precision {self.precision.name}, attention {self.model.attention_backend}, "
            f"starting at step {self.step} (micro-batch {self.micro_step})"
        )

    # ----------------------------------------------------------------------------------------------- the step

    def train_step(self) -> StepResult:
        tc, m = self.cfg.train, self.cfg.model
        self.ddp.train()
        loss_total = torch.zeros((), device=self.device)
        for micro in range(tc.accumulation_steps):
            # The batch was requested a step ago (loader in flight / encoder thread); time only the wait for it.
            wait_start = time.perf_counter()
            batch, stats = self.source.next()
            wait_s = time.perf_counter() - wait_start
            self.note_batch(batch, stats, wait_s)
            batch = batch.to(self.device, torch.float32)
            # One memory layout whatever the source: the VAE returns channels-last latents, a cache or the
            # transport contiguous ones, and the kernels (hence the last bits of the loss) differ between them.
            x0 = batch.latents.contiguous()  # (B, C, h, w)
            b = len(batch)

            # This micro-batch's own random stream: CFG masks, timesteps, noise.
            gen = generator(tc.seed, self.micro_step, self.ranks.rank, "train")
            context, pooled = cfg_dropout(
                batch.context.contiguous(), batch.pooled.contiguous(), m.text_tokens,
                tc.null_prob_pooled, tc.null_prob_gemma, tc.null_prob_bert, gen,
            )  # (B, 2T, D), (B, P)
            t = sample_timesteps(b, gen, self.device, tc.timestep_mean, tc.timestep_std)  # (B,)
            noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(self.device)  # (B, C, h, w)
            x_t = add_noise(x0, noise, t)  # (B, C, h, w)
            target = velocity_target(x0, noise)  # (B, C, h, w)

            # DDP all-reduces gradients inside backward; before the last micro-batch only accumulate locally.
            last = micro == tc.accumulation_steps - 1
            sync = self.ddp.no_sync() if self.is_ddp and not last else contextlib.nullcontext()
            with sync:
                with self.precision.autocast():
                    pred = self.ddp(x_t, t, context, pooled)  # (B, C, h, w)
                loss = flow_loss(pred, target) / tc.accumulation_steps
                self.scaler.scale(loss).backward()
            loss_total += loss.detach()
            self.micro_step += 1

        self.scaler.unscale_(self.optimizer)  # a no-op without fp16; clipping must see true gradient sizes
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        # fp16: the GradScaler skips steps with inf gradients by itself (it is how it finds its scale); only a
        # non-finite loss counts. Otherwise a non-finite loss or gradient norm means: do not touch the weights.
        finite = torch.isfinite(loss_total) if self.scaler.is_enabled() else torch.isfinite(loss_total) & torch.isfinite(grad_norm)
        stop_here = signals.requested() or self.stop_from_source
        # One all_reduce per step carries the loss for the log and the two decisions every rank must share.
        shared = torch.stack([loss_total.float(), (~finite).float(), torch.tensor(float(stop_here), device=self.device)])
        if self.is_ddp:
            dist.all_reduce(shared, op=dist.ReduceOp.SUM, group=self.ranks.group)
        loss_mean, any_bad, any_stop = shared.tolist()
        loss_mean /= self.ranks.world
        lr = self.optimizer.param_groups[0]["lr"]

        skipped = any_bad > 0
        if skipped:
            self.counters.nonfinite_steps += 1
            self.counters.nonfinite_in_row += 1
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.counters.nonfinite_in_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        # The schedule is a function of the step count, skipped steps included, like the sampler's position.
        self.scheduler.step()
        self.step += 1
        if not skipped and self.step % tc.ema_update_every == 0:
            self.ema.update(self.model)
        if self.counters.nonfinite_in_row >= tc.max_nonfinite:
            raise NonFiniteError(
                f"{self.counters.nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(last at step {self.step}, loss {loss_mean}); stopping (train.max_nonfinite={tc.max_nonfinite})"
            )
        return StepResult(loss_mean, float(grad_norm), lr, skipped, any_stop > 0)

    def note_batch(self, batch, stats, wait_s: float) -> None:
        """Bookkeeping of one received micro-batch: throughput window, skip counters, the row audit file."""
        b = len(batch)
        h, w = batch.latents.shape[-2:]
        m = self.cfg.model
        height, width = h * m.vae_downsample, w * m.vae_downsample
        tokens = (h // m.patch_size) * (w // m.patch_size) * b
        flops = train_flops_per_image(m, height, width) * b if b else 0.0
        self.window.add_batch(b, tokens, flops, wait_s)
        self.window.add_loader_timings(stats.timings)
        self.skipped_rows = dict(stats.skipped)
        self.stop_from_source = self.stop_from_source or stats.stop_requested
        self.counters.images += b
        if self.rows_file is not None:
            self.rows_file.write(f"{stats.step} " + " ".join(str(int(r)) for r in batch.row_ids.tolist()) + "\n")

    # ----------------------------------------------------------------------------------------------- the run

    def train(self) -> int:
        """Run to train.total_steps, or until a stop signal (then checkpoint and return signals.PREEMPTED_EXIT_CODE)."""
        tc = self.cfg.train
        try:
            while self.step < tc.total_steps:
                result = self.train_step()
                self.window.steps += 1
                self.log.advance()
                if self.step % tc.log_every == 0 or result.stop or self.step == tc.total_steps:
                    self.report(result)
                if result.stop:
                    self.save()
                    self.log.info(
                        f"stop requested ({', '.join(signals.received()) or 'by a peer rank'}): "
                        f"checkpoint at step {self.step} written, exiting"
                    )
                    self.finish()
                    return signals.PREEMPTED_EXIT_CODE
                if self.step % tc.save_every == 0:
                    self.save()
            if self.last_saved != self.step:
                self.save()
            self.finish()
            return 0
        except BaseException as e:
            self.source.fail(f"model rank {self.ranks.rank}: {type(e).__name__}: {e}")
            if self.rows_file is not None:
                self.rows_file.close()
            self.log.close()
            raise

    def finish(self) -> None:
        """Release the data source (loaders stop after the last consumed step) and wait for every model rank."""
        self.source.stop(self.micro_step)
        if self.rows_file is not None:
            self.rows_file.close()
        if self.is_ddp:
            # Rank 0 may still be writing the last checkpoint; nobody leaves before it is on disk.
            dist.barrier(group=self.ranks.group)
        self.log.close()

    def report(self, result: StepResult) -> None:
        """Log the window since the last report (all model ranks call this: the skip counters are all-reduced)."""
        values: dict[str, Any] = {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm}
        values.update(self.window.report(self.peak))
        values["stall_pct_max"] = self.max_over_ranks(values["stall_pct"])  # rank 0's own stall can hide a slow rank
        values["nonfinite_steps"] = self.counters.nonfinite_steps
        for reason, count in self.total_skipped_rows().items():
            values[f"skipped_{reason}"] = count
        self.log.log(self.step, values)
        # The loader's timings are cumulative: the next window starts from this window's last reading.
        self.window = Window(loader_start=dict(self.window.loader_now))

    def max_over_ranks(self, value: float) -> float:
        """The largest `value` over the model ranks (a collective, like total_skipped_rows)."""
        if not self.is_ddp:
            return value
        values = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.ranks.group)
        return values.item()

    def total_skipped_rows(self) -> dict[str, int]:
        """Rows skipped as bad, per reason, summed over loaders (checkpointed base + this process's sources).

        A collective: every model rank calls it at the same step. In loader mode every consumer of a loader sees
        that loader's counts, so only its first consumer contributes (source.counts_rows); colocated and cached
        ranks are each their own loader. The vector has a fixed vocabulary so every rank sends the same shape.
        """
        mine = self.skipped_rows if getattr(self.source, "counts_rows", True) else {}
        values = torch.tensor([float(v) for v in skip_vector(mine)], dtype=torch.float64)
        if self.is_ddp:
            values = values.to(self.device)
            dist.all_reduce(values, op=dist.ReduceOp.SUM, group=self.ranks.group)
        base = self.counters.skipped_rows
        return {r: int(base.get(r, 0) + v) for r, v in zip(SKIP_VOCABULARY, values.tolist())}

    # ----------------------------------------------------------------------------------------------- checkpoints

    def save(self) -> None:
        """Write a checkpoint (model group rank 0 only); the other ranks carry on to the next all_reduce."""
        self.last_saved = self.step
        skipped_rows = self.total_skipped_rows()  # a collective, so before the rank-0-only part
        if not self.ranks.is_main:
            return

        model_state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        sampler_states = {str(i): {"step": self.micro_step} for i in range(self.source.num_loaders)}
        train_state = {
            "step": self.step,
            "micro_step": self.micro_step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
            "samplers": sampler_states,
            "counters": {
                "images": self.counters.images,
                "nonfinite_steps": self.counters.nonfinite_steps,
                "nonfinite_in_row": self.counters.nonfinite_in_row,
                "skipped_rows": skipped_rows,
            },
            "wandb_run_id": self.run_id,
        }
        meta = {"step": self.step, "micro_step": self.micro_step, "wandb_run_id": self.run_id, "images": self.counters.images}
        start = time.perf_counter()
        path = save_checkpoint(
            self.cfg.train.save_dir, self.step, model_state, self.ema.state_dict(), train_state,
            self.cfg.to_dict(), meta, self.cfg.train.keep_last,
        )
        self.log.info(f"checkpoint {path} ({time.perf_counter() - start:.1f} s)")

    def restore(self, resume: Resume) -> None:
        """Load weights and EMA; with exact=True also the optimizer, schedule, scaler, RNG, counters and position."""
        loaded = resume.loaded
        try:
            self.model.load_state_dict(loaded.model_state)
        except RuntimeError as e:
            raise RuntimeError(f"checkpoint {resume.directory} does not fit [model] of this config: {e}") from None
        if loaded.ema_state:
            self.ema.load_state_dict(loaded.ema_state)
        else:
            self.ema = EMA(self.model, self.cfg.train.ema_decay, self.ema_device)
        meta = loaded.meta or {}
        if resume.keep_wandb_id and meta.get("wandb_run_id"):
            self.run_id = str(meta["wandb_run_id"])
        if not resume.exact:
            return
        ts = loaded.train_state
        self.optimizer.load_state_dict(ts["optimizer"])
        self.scheduler.load_state_dict(ts["scheduler"])
        if ts.get("scaler"):
            self.scaler.load_state_dict(ts["scaler"])
        restore_rng_state(ts["rng"])
        self.step = int(ts["step"])
        self.micro_step = int(ts["micro_step"])
        c = ts.get("counters", {})
        self.counters = Counters(
            images=int(c.get("images", 0)),
            nonfinite_steps=int(c.get("nonfinite_steps", 0)),
            nonfinite_in_row=int(c.get("nonfinite_in_row", 0)),
            skipped_rows={str(k): int(v) for k, v in c.get("skipped_rows", {}).items()},
        )
        self.last_saved = self.step

