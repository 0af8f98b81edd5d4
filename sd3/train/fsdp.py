"""FSDP2 for the model ranks (train.parallelism = "fsdp"): parameters, gradients and optimizer state sharded over
the model group, applied to the MMDiT from outside as torchtitan does (`fully_shard` per block, then the root).

Mixed precision: parameters are gathered in bf16 for compute and gradients reduce-scattered in fp32
(MixedPrecisionPolicy), so sharding changes no sum's precision compared with DDP's fp32 all-reduce.

Checkpoints keep the one format every mode reads (model.safetensors / ema.safetensors with full, unsharded tensors,
optimizer state keyed by parameter name): full tensors are gathered on save and re-sharded on load. A sharded format
(torch.distributed.checkpoint) would save faster at 8B+, but it would need a converter for sampling, for a change
of world size and for DDP; at 1.2B (~5 GB of fp32 weights + EMA) gathering is seconds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def shard_model(model: nn.Module, group: dist.ProcessGroup | None, device: torch.device,
                param_dtype: torch.dtype | None) -> DeviceMesh:
    """Shard `model` in place over `group` (None: the default group): each block is its own FSDP unit, so one
    block's full parameters exist at a time; the root unit holds the embeddings and the head. Returns the mesh."""
    mesh = DeviceMesh.from_group(group or dist.group.WORLD, device.type)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return mesh


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Unsharded copies on the CPU of every DTensor in `state` (a collective: every model rank must call it)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}


@torch.no_grad()
def load_full(target: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into `target` (a state_dict of DTensor shards or plain tensors), each rank its shard."""
    for key, dest in target.items():
        value = full[key]
        if isinstance(dest, DTensor):
            value = distribute_tensor(value.to(dest.device, dest.dtype), dest.device_mesh, dest.placements)
            dest.to_local().copy_(value.to_local())
        else:
            dest.copy_(value.to(dest.device, dest.dtype))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, full tensors on the CPU: the same for DDP and FSDP, so a
    checkpoint of one resumes under the other (a collective under FSDP)."""
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load `optimizer_state()`'s output, sharding it where the model is sharded (every rank passes the full state)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
