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

from sd3.model.layers import fit_scalar

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


def full_tensors(state: dict[str, torch.Tensor], keep: bool = True) -> dict[str, torch.Tensor]:
    """Unsharded copies on the CPU of every DTensor in `state` (a collective: every model rank must call it).

    keep=False: take part in the gathers but keep nothing (returns {}), one tensor gathered at a time, so only the
    rank that needs the full weights (rank 0, validating) holds a host copy of them.
    """
    out = {}
    for k, v in state.items():
        full = (v.full_tensor() if isinstance(v, DTensor) else v).detach()
        if keep:
            out[k] = full.cpu()
    return out


@torch.no_grad()
def load_full(target: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
    """Copy full tensors into `target` (a state_dict of DTensor shards or plain tensors), each rank its shard.
    Keys must match; a () scalar of an older checkpoint fills a (1,) parameter."""
    if target.keys() != full.keys():
        raise KeyError(f"keys differ from the model's: {sorted(set(target) ^ set(full))[:5]}")
    for key, dest in target.items():
        value = fit_scalar(full[key], dest.shape)
        if value.shape != dest.shape:
            raise ValueError(f"'{key}' has shape {tuple(value.shape)}, expected {tuple(dest.shape)}")
        if isinstance(dest, DTensor):
            value = distribute_tensor(value.to(dest.device, dest.dtype), dest.device_mesh, dest.placements)
            dest.to_local().copy_(value.to_local())
        else:
            dest.copy_(value.to(dest.device, dest.dtype))


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter the optimizer holds, in its own order (the ids of an int-keyed state_dict)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _rekey(state: dict[str, Any], keys: list) -> dict[str, Any]:
    """`state` with its parameter keys replaced: position i of the param groups' lists becomes keys[i]."""
    old = [k for group in state["param_groups"] for k in group["params"]]
    if len(old) != len(keys):
        raise ValueError(f"optimizer state holds {len(old)} parameters, this optimizer {len(keys)}")
    mapping = dict(zip(old, keys, strict=True))
    return {"state": {mapping[k]: v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [mapping[k] for k in g["params"]]} for g in state["param_groups"]]}


def is_name_keyed(state: dict[str, Any]) -> bool:
    """optimizer_state()'s format (keys are parameter names); False for torch's own int-keyed state_dict, which
    checkpoints saved before FSDP support hold."""
    return all(isinstance(k, str) for group in state["param_groups"] for k in group["params"])


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, full tensors on the CPU: the same for DDP and FSDP, so a
    checkpoint of one resumes under the other (a collective under FSDP; the full state is on rank 0 only, the
    other ranks get {})."""
    if is_sharded(model):
        return get_optimizer_state_dict(model, optimizer, options=FULL)
    return _rekey(optimizer.state_dict(), _param_names(model, optimizer))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load `optimizer_state()`'s output, or an int-keyed state_dict of the same optimizer layout, sharding it
    where the model is sharded (under FSDP every rank passes the full state)."""
    names = _param_names(model, optimizer)
    if not is_sharded(model):
        # torch's own loader wants ids: each name becomes its parameter's position in this optimizer.
        if is_name_keyed(state):
            ids = {name: i for i, name in enumerate(names)}
            saved = [k for group in state["param_groups"] for k in group["params"]]
            if sorted(saved) != sorted(names):
                raise ValueError(f"optimizer state's parameters differ from the model's: "
                                 f"{sorted(set(saved) ^ set(names))[:5]}")
            state = _rekey(state, [ids[k] for k in saved])
        optimizer.load_state_dict(state)
        return
    if not is_name_keyed(state):
        state = _rekey(state, names)
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


class ModelState:
    """The checkpointer's view of the model (sharded or not): full tensors out, full tensors in.

    Unsharded, `state_dict()` is the module's own (no copy); sharded, it gathers (a collective on every rank)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return full_tensors(self.model.state_dict()) if is_sharded(self.model) else self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if is_sharded(self.model):
            load_full(self.model.state_dict(), state)
        else:
            self.model.load_state_dict(state)  # the layers' own hooks take () scalars of older checkpoints


class OptimizerState:
    """The checkpointer's view of the optimizer: `optimizer_state` / `load_optimizer_state`, one format for both
    modes; int-keyed states of checkpoints saved before it still load."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return optimizer_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_optimizer_state(self.model, self.optimizer, state)
