"""`sd3 train --config PRESET [--section.key=value ...]`: train the MMDiT.

Under torchrun every process runs this; its role comes from [topology] (sd3/distributed): loader ranks encode and
send batches (`run_loader`), model ranks train (`Trainer`). With topology.mode=colocated or cached, every
process is a model rank with its own data, and a single process needs no torchrun at all.

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

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sd3.config import Config, TrainConfig
from sd3.config_loader import load_config
from sd3.errors import user_error_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset name (sd3/configs) or path to a TOML file")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    return run(cfg)


@contextlib.contextmanager
def runtime_settings(tc: TrainConfig) -> Iterator[None]:
    """train.num_threads and train.deterministic for the duration of a run, restored afterwards (a run inside
    a longer-lived process — a test session, a notebook — leaves the process as it found it)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    benchmark = torch.backends.cudnn.benchmark
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    if tc.deterministic:
        # Exact resume on CPU: the same kernels in the same order give bit-identical steps.
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = benchmark


def resume_plan(cfg: Config) -> tuple[Path | None, bool, bool]:
    """(checkpoint dir or None, exact, keep_wandb_id) for train.resume; see the module docstring."""
    from sd3.train.checkpoint import resolve_checkpoint

    spec = cfg.train.resume
    if not spec:
        return None, False, False
    if spec == "auto":
        directory = resolve_checkpoint("auto", save_dir=cfg.train.save_dir)
        return (Path(directory) if directory else None), True, True
    directory = resolve_checkpoint(spec)
    if directory is None:
        raise FileNotFoundError(f"train.resume={spec}: no checkpoint there")
    return Path(directory), not cfg.train.reset_optim, not cfg.train.reset_wandb


def sampler_start(train_state: dict, loader_index: int) -> int:
    """The first sampler step a loader sends on resume: what the model ranks had consumed at the checkpoint."""
    samplers = train_state.get("samplers", {})
    if str(loader_index) in samplers:
        return int(samplers[str(loader_index)]["step"])
    return int(train_state["micro_step"])


def run(cfg: Config, after_train: Callable[[Any], None] | None = None) -> int:
    """Run this process's part of the job; returns its exit code.

    after_train(trainer) runs on each model rank once training returned (tests use it to inspect the replica).
    """
    with runtime_settings(cfg.train):
        return run_rank(cfg, after_train)


def run_rank(cfg: Config, after_train: Callable[[Any], None] | None) -> int:
    from sd3.distributed import init_distributed, shutdown_distributed
    from sd3.distributed.heartbeat import name_hung_first

    topology = init_distributed(cfg)
    who = f"rank {topology.rank} ({topology.role})"
    try:
        directory, exact, keep_wandb = resume_plan(cfg)
        if topology.is_loader:
            from sd3.distributed.loader import run_loader

            start = 0
            if directory is not None and exact:
                start = sampler_start(torch.load(directory / "state.pt", map_location="cpu", weights_only=True), topology.loader_index)
            return run_loader(cfg, topology, start)
        return train_model_rank(cfg, topology, directory, exact, keep_wandb, after_train)
    except Exception as e:  # noqa: BLE001 - one line naming the rank, then a non-zero exit
        line = user_error_line(e)  # a bad path, file or value found inside the rank: exit 2, as at parse time
        if line:
            print(f"sd3 train: {who}: error: {line}", file=sys.stderr, flush=True)
            return 2
        # A rank whose heartbeat stopped is named first: it is the likely cause of this one's timeout.
        text = name_hung_first(topology.store, list(range(topology.world_size)), f"{type(e).__name__}: {e}",
                               topology.rank)
        print(f"sd3 train: {who}: {text}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutdown_distributed()


def train_model_rank(cfg: Config, topology, directory: Path | None, exact: bool, keep_wandb: bool,
                     after_train: Callable[[Any], None] | None = None) -> int:
    from sd3.distributed import signals

    with signals.handled():
        try:
            trainer = build_trainer(cfg, topology, directory, exact, keep_wandb)
            code = trainer.train()
            if after_train is not None:
                after_train(trainer)
            return code
        finally:
            signals.clear()


def build_trainer(cfg: Config, topology, directory: Path | None, exact: bool, keep_wandb: bool):
    """The Trainer of a model rank: its data source from the topology, started from `directory` if given."""
    from sd3.train.checkpoint import load_checkpoint
    from sd3.train.sources import build_source
    from sd3.train.trainer import ModelRanks, Resume, Trainer

    resume = None
    start = 0
    if directory is not None:
        loaded = load_checkpoint(directory, map_location="cpu")
        resume = Resume(directory, loaded, exact, keep_wandb)
        if exact:
            start = sampler_start(loaded.train_state, topology.loader_index)
        if topology.is_main:
            kind = "continuing exactly" if exact else "weights and EMA only (reset_optim): new stage from step 0"
            print(f"sd3 train: resuming from {directory}, {kind}", flush=True)
    ranks = ModelRanks(
        device=topology.device,
        group=topology.model_group if topology.num_model_ranks > 1 else None,
        rank=topology.model_rank,
        world=topology.num_model_ranks,
    )
    source = build_source(cfg, topology, topology.device, start)
    return Trainer(cfg, ranks, source, resume)
