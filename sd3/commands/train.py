"""`sd3 train --config PRESET [--section.key=value ...]`: train the MMDiT.

Under torchrun every process runs this; its role comes from [topology] (sd3/distributed): loader ranks encode and
send batches (`run_loader`), model ranks train (`Trainer`). With topology.mode=colocated or cached, every
process is a model rank with its own data, and a single process needs no torchrun at all. Resume
(`--train.resume=auto|PATH`, reset_optim, reset_wandb) is decided once by sd3/train/checkpointer.py.
With validation.every > 0, model rank 0 builds the Validator (sd3/eval/validation.py) and hands it to its Trainer (under
FSDP the other model ranks get a ValidationPeer, which joins the gathers of the sharded weights).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from sd3.config import Config, TrainConfig
from sd3.config_loader import load_config
from sd3.distributed import init_distributed, shutdown_distributed, signals
from sd3.distributed.heartbeat import name_hung_first
from sd3.distributed.loader import run_loader
from sd3.errors import user_error_line
from sd3.eval.validation import ValidationPeer, Validator
from sd3.train.checkpoint import check_checkpoint
from sd3.train.checkpointer import ResumePlan, data_start, plan_resume
from sd3.train.sources import build_source, loader_sampler
from sd3.train.trainer import ModelRanks, Trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset name (sd3/configs) or path to a TOML file")


def main(args: argparse.Namespace) -> int:
    return run(load_config(args.config, args.overrides))


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


def run(cfg: Config, after_train: Callable[[Any], None] | None = None) -> int:
    """Run this process's part of the job; returns its exit code.

    after_train(trainer) runs on each model rank once training returned (tests use it to inspect the replica).
    """
    with runtime_settings(cfg.train):
        topology = init_distributed(cfg)
        try:
            plan = plan_resume(cfg)
            if topology.is_loader:
                sampler = loader_sampler(cfg, topology)
                return run_loader(cfg, topology, data_start(plan, sampler), sampler)
            return train_model_rank(cfg, topology, plan, after_train)
        except Exception as e:  # noqa: BLE001 - one line naming the rank, then a non-zero exit
            who = f"rank {topology.rank} ({topology.role})"
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


def train_model_rank(cfg: Config, topology, plan: ResumePlan | None,
                     after_train: Callable[[Any], None] | None = None) -> int:
    """Build this model rank's source and Trainer (from `plan` if given), train, and return the exit code."""
    with signals.handled():
        try:
            if plan is not None:
                check_checkpoint(plan.directory)
            source = build_source(cfg, topology, topology.device, plan)
            if plan is not None and topology.is_main:
                print(f"sd3 train: resuming from {plan.directory}, {resume_kind(plan, source.sampler.resumed)}",
                      flush=True)
            group = topology.model_group if topology.num_model_ranks > 1 else None
            ranks = ModelRanks(topology.device, group, topology.model_rank, topology.num_model_ranks)
            # Built before the first step (it encodes the prompts and held-out rows once); the loaders are already
            # producing meanwhile, and the other model ranks wait for rank 0 at the Trainer's first collective.
            validator = None
            if cfg.validation.every > 0 and ranks.is_main:
                validator = Validator(cfg, topology.device)
            elif cfg.validation.every > 0 and cfg.train.parallelism == "fsdp" and ranks.world > 1:
                validator = ValidationPeer(cfg)  # joins rank 0's gathers of the sharded weights
            trainer = Trainer(cfg, ranks, source, plan, validator=validator)
            code = trainer.train()
            if after_train is not None:
                after_train(trainer)
            return code
        finally:
            signals.clear()


def resume_kind(plan: ResumePlan, data: str | None) -> str:
    """What the resume line says: "continuing exactly" only when the data stream continues identically too."""
    if not plan.exact:
        return "weights and EMA only (reset_optim): new stage from step 0"
    if data == "exact":
        return "continuing exactly"
    return ("continuing on a new layout: the rest of the epoch is re-planned, no row missed or repeated "
            "(the model's random streams differ from an uninterrupted run)")
