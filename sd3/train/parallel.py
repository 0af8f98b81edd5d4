"""parallelize(model, cfg, ranks): data parallelism and compilation applied to the MMDiT from outside.

train.parallelism = "ddp": the network stays a plain nn.Module (checkpoints, EMA and clipping use it directly) and
what runs the forward and backward is the DDP wrapper returned here. "fsdp": fully_shard turns the network itself
into a sharded module in place (its parameters become DTensor shards; sd3/train/fsdp.py), so it must happen before
the optimizer and the EMA are built from those parameters. Both are applied from outside (torchtitan's habit).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from sd3.config import TrainConfig
from sd3.train.fsdp import shard_model

# Newer torch (2.13 here) names it forward_sync_buffers and warns on broadcast_buffers; older has only the latter.
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                          else {"broadcast_buffers": False})


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

    @property
    def is_ddp(self) -> bool:
        """Several model ranks in a group: gradients are synchronised (by DDP or FSDP) and decisions shared."""
        return self.group is not None and self.world > 1


def sharded(cfg: TrainConfig, ranks: ModelRanks) -> bool:
    """Whether parallelize() shards the model: train.parallelism = fsdp over several model ranks (alone, a rank
    has nothing to shard over and trains the plain module)."""
    return cfg.parallelism == "fsdp" and ranks.is_ddp


def parallelize(
    model: nn.Module, cfg: TrainConfig, ranks: ModelRanks, precision: torch.dtype | None = None,
) -> nn.Module:
    """The module that trains: DDP over the model group when there are several model ranks, or with
    train.parallelism = fsdp the model itself sharded in place (FSDP2 gathers parameters in `precision`, the
    autocast dtype, and reduces gradients in fp32); then torch.compile if train.compile.

    gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets instead of separate tensors
    copied into them, which saves one copy of the gradients (~5 GB at the 1.2B size in fp32). bucket_cap_mb:
    the bucket size; larger buckets mean fewer all-reduce launches, smaller ones start communicating earlier.
    No buffer sync before each forward: the model's buffers (RoPE tables) are computed identically on every rank.
    """
    wrapped = model
    if sharded(cfg, ranks):
        shard_model(model, ranks.group, ranks.device, precision)
    elif ranks.is_ddp:
        wrapped = DistributedDataParallel(
            model, process_group=ranks.group, gradient_as_bucket_view=True, bucket_cap_mb=cfg.bucket_cap_mb,
            **NO_FORWARD_BUFFER_SYNC,
        )
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def gradient_sync(wrapped: nn.Module, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Gradient accumulation: synchronise gradients only on the last micro-batch of a step.

    DDP: the no_sync() context around the other micro-batches' backward. FSDP: the reduce-scatter is switched off
    (set_requires_gradient_sync) until the last micro-batch, so each rank accumulates full unsharded gradients
    locally — more memory than sharded ones, but one reduce-scatter per step instead of one per micro-batch.
    """
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    ddp = getattr(wrapped, "_orig_mod", wrapped)  # under torch.compile
    if not last and isinstance(ddp, DistributedDataParallel):
        return wrapped.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over all parameters; the total norm before clipping as a plain device scalar.

    Under FSDP the gradients are shards, and the norm torch computes from them is a DTensor whose full value needs
    the shards' partial sums (full_tensor(): an all-reduce): the same global norm DDP gives.
    """
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
