"""The Checkpointer: saves and loads a set of components that each own their state (torchtitan's habit).

Components are anything with `state_dict()` / `load_state_dict()`: the model and EMA go to safetensors files,
the rest (optimizer, scheduler, scaler, train state) into state.pt under their names. Resume decisions
(train.resume = auto | PATH, reset_optim, reset_wandb) are made here once, as a `ResumePlan`, and every rank —
loader or model — starts from the same plan.

Resume (`--train.resume=auto|PATH`):
- `auto` continues this run from the latest checkpoint in train.save_dir (fresh start if there is none) and
  restores everything: weights, EMA, optimizer, schedule, scaler, RNG, data position, wandb run. It is what a
  requeued SLURM job runs, so reset_optim / reset_wandb do not apply to it.
- `PATH` (a checkpoint directory or a save_dir) starts from that checkpoint. With train.reset_optim (the
  source's default for a new stage such as resolution fine-tuning) only the weights and EMA are kept: fresh
  optimizer and warm-up, step 0, data from the start. train.reset_wandb starts a new wandb run. A changed
  model.max_res needs nothing else: RoPE positions are scaled by max_res / max_res_orig.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from sd3.config import Config
from sd3.data.sampler import BucketBatchSampler
from sd3.errors import CheckpointError
from sd3.train.checkpoint import load_checkpoint, read_meta, resolve_checkpoint, save_checkpoint
from sd3.train.logging import new_run_id

WEIGHT_COMPONENTS = ("model", "ema")  # written as model.safetensors / ema.safetensors; kept by keep_every


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass(frozen=True)
class ResumePlan:
    """A checkpoint to start from. exact=True restores every component (optimizer, schedule, step, data
    position ...); exact=False (reset_optim) keeps only the weights and the EMA and starts a new stage at step 0."""

    directory: Path
    exact: bool
    keep_wandb_id: bool


def plan_resume(cfg: Config) -> ResumePlan | None:
    """The ResumePlan of train.resume and train.init_from, or None for a fresh run.

    resume=auto continues this save_dir's own newest checkpoint when there is one — always exactly, whatever
    init_from says, so a requeued stage-2 job goes on from where it got, not back to stage 1's weights. Only a job
    with no checkpoint of its own starts from init_from (another run's weights and EMA, reset_optim / reset_wandb
    applying), or from scratch. resume=PATH continues (or, with reset_optim, starts a stage from) that checkpoint.
    """
    tc = cfg.train
    if tc.resume == "auto":
        own = resolve_checkpoint("auto", save_dir=tc.save_dir)
        if own:
            return ResumePlan(Path(own), True, True)
    elif tc.resume:
        if tc.init_from:
            raise CheckpointError(f"train.resume={tc.resume} and train.init_from={tc.init_from}: give one (resume=auto "
                                  "with init_from starts from init_from once, then resumes its own checkpoints)")
        return _plan_from(tc.resume, "train.resume", cfg)
    return _plan_from(tc.init_from, "train.init_from", cfg) if tc.init_from else None


def _plan_from(spec: str, key: str, cfg: Config) -> ResumePlan:
    directory = resolve_checkpoint(spec)
    if directory is None:
        raise CheckpointError(f"{key}={spec}: no checkpoint there")
    return ResumePlan(Path(directory), not cfg.train.reset_optim, not cfg.train.reset_wandb)


def data_start(plan: ResumePlan | None, sampler: BucketBatchSampler) -> int:
    """The first sampler step this rank's loader serves: 0, or the data position saved in meta.json.

    Reads meta.json only — a loader rank never opens state.pt (~10 GB of optimizer state at the 1.2B size) to
    learn one integer. The position is one for all loaders; resumed under another layout (loaders, model ranks,
    per-rank batch, data mode) the sampler re-plans the rest of the epoch (sampler.resumed == "elastic"). Another
    seed or other data cannot continue the stream: a one-line error names what changed.
    """
    if plan is None or not plan.exact:
        return 0
    position = read_meta(plan.directory).get("sampler")
    if not position:
        raise CheckpointError(f"checkpoint {plan.directory}: meta.json has no data position")
    try:
        sampler.load_state_dict(position)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {plan.directory}: {e} (train.reset_optim=true starts a new stage from "
                              "its weights instead)") from None
    return sampler.step


class Checkpointer:
    """Saves `components` (name -> Stateful) to train.save_dir and restores them from a ResumePlan.

    components must include "model", "ema" and "train" (the TrainState); is_main: this rank writes (the model
    group's rank 0); group: the model ranks' process group, or None when training alone; sharded: the model is
    sharded (FSDP), so every model rank calls every component's state_dict() — gathering the full tensors is a
    collective — and rank 0 alone writes them. The files are the same in both modes (sd3/train/fsdp.py).
    """

    def __init__(self, cfg: Config, components: dict[str, Stateful], is_main: bool, group: Any = None,
                 sharded: bool = False):
        self.cfg = cfg
        self.components = components
        self.is_main = is_main
        self.sharded = sharded
        self.last_saved = -1
        self.barrier_group = None
        if group is not None:
            # Rank 0 writes ~20 GB at the 1.2B size. The other ranks wait for it in a gloo barrier of its own with
            # a long deadline, not inside the next NCCL all_reduce under the watchdog's timeout (which would abort
            # them). use_local_synchronization: only the model ranks create it, the loaders are not involved.
            self.barrier_group = dist.new_group(
                dist.get_process_group_ranks(group), backend="gloo", use_local_synchronization=True,
                timeout=datetime.timedelta(minutes=cfg.train.save_timeout_minutes),
            )

    @property
    def train_state(self):
        return self.components["train"]

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (rank 0), then every model rank waits until it is on disk."""
        ts = self.train_state
        self.last_saved = ts.step
        path = None
        if self.is_main or self.sharded:
            states = {name: c.state_dict() for name, c in self.components.items() if name not in WEIGHT_COMPONENTS}
            model_state, ema_state = self.components["model"].state_dict(), self.components["ema"].state_dict()
        if self.is_main:
            tc = self.cfg.train
            path = save_checkpoint(tc.save_dir, ts.step, model_state, ema_state, states, self.cfg.to_dict(), ts.meta(),
                                   tc.keep_last, tc.keep_every)
        if self.barrier_group is not None:
            timeout = datetime.timedelta(minutes=self.cfg.train.save_timeout_minutes)
            dist.monitored_barrier(self.barrier_group, timeout=timeout)
        return path

    def load(self, plan: ResumePlan) -> None:
        """Restore the weights and EMA; with plan.exact every other component too. Every model rank reads the
        checkpoint's full tensors; sharded components keep their own shards of them."""
        loaded = load_checkpoint(plan.directory, map_location="cpu")
        try:
            self.components["model"].load_state_dict(loaded.model_state)
        except (RuntimeError, KeyError, ValueError) as e:
            raise RuntimeError(f"checkpoint {plan.directory} does not fit [model] of this config: {e}") from None
        self.components["ema"].load_state_dict(loaded.ema_state)
        ts = self.train_state
        if plan.exact:
            if not loaded.train_state:
                raise ValueError(f"checkpoint {plan.directory} holds weights only (kept by train.keep_every): it can "
                                 "start a new stage (train.reset_optim=true), not continue a run exactly")
            for name, component in self.components.items():
                if name not in WEIGHT_COMPONENTS and loaded.train_state.get(name):
                    component.load_state_dict(loaded.train_state[name])
            self.last_saved = ts.step
        meta_id = str(loaded.meta.get("wandb_run_id", ""))
        ts.run_id = meta_id if plan.keep_wandb_id and meta_id else new_run_id()
