"""Exponential moving average of the model weights, kept in fp32 (the weights the samplers use).

shadow ← decay·shadow + (1 − decay)·weight at every `update` call; the trainer decides how often to call it
(source README: every `ema_update_freq` = 100 optimizer steps with `ema_decay` = 0.99). The shadow lives on the
model's device by default (train.ema_device = "device": one fused `_foreach_lerp_` over all tensors, no
host copy, no host sync) or on the CPU to save accelerator memory (train.ema_device = "cpu").

Under FSDP (train.parallelism = "fsdp") the model's state_dict holds DTensor shards, so each shadow is a shard too:
every rank averages its own part, and `state_dict()` gathers the full tensors (a collective on every model rank).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from sd3.model.layers import fit_scalar
from sd3.train.fsdp import full_tensors, load_full


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DDP (`.module`) and torch.compile (`._orig_mod`), so keys match the MMDiT's."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class EMA:
    """fp32 shadow copy of `model.state_dict()`.

    model: the network to track (DDP / compiled wrappers are unwrapped); decay: weight of the old average per
    update, in [0, 1); device: where the shadow lives. Floating-point parameters are averaged; buffers and
    non-float entries are copied as they are, so the shadow is a complete state_dict of the model.
    """

    def __init__(self, model: nn.Module, decay: float, device: torch.device | str = "cpu") -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.device = torch.device(device)
        model = unwrap(model)
        self._averaged = {name for name, p in model.named_parameters() if p.is_floating_point()}
        self.shadow: dict[str, torch.Tensor] = {
            k: self._to_shadow(v).clone() for k, v in model.state_dict().items()
        }

    def _check_keys(self, state: dict[str, torch.Tensor], where: str) -> None:
        if state.keys() != self.shadow.keys():
            diff = sorted(set(self.shadow) ^ set(state))
            raise KeyError(f"EMA.{where}: keys differ from the model's the EMA was made for: {diff[:5]}")

    def _to_shadow(self, value: torch.Tensor) -> torch.Tensor:
        dtype = torch.float32 if value.is_floating_point() else value.dtype
        return value.detach().to(device=self.device, dtype=dtype)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One averaging step towards the current weights of `model`."""
        state = unwrap(model).state_dict()
        self._check_keys(state, "update")
        averaged = [k for k in self.shadow if k in self._averaged]
        shadows = [self.shadow[k] for k in averaged]
        values = [self._to_shadow(state[k]) for k in averaged]  # the weights themselves when fp32 on this device
        if shadows:
            torch._foreach_lerp_(shadows, values, 1.0 - self.decay)  # shadow + (1-decay)·(value - shadow)
        for key, shadow in self.shadow.items():
            if key not in self._averaged:
                shadow.copy_(self._to_shadow(state[key]))

    @property
    def sharded(self) -> bool:
        return any(isinstance(v, DTensor) for v in self.shadow.values())

    def state_dict(self, keep: bool = True) -> dict[str, torch.Tensor]:
        """The fp32 averaged weights, keyed like the model's state_dict (written to ema.safetensors): full tensors,
        gathered from the shards when sharded (then every model rank must call it; keep=False: a rank that only
        takes part in the gathers, which gets {})."""
        return full_tensors(self.shadow, keep) if self.sharded else dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Full tensors (ema.safetensors) into the shadow, each rank taking its shard when sharded."""
        self._check_keys(state, "load_state_dict")
        state = {k: fit_scalar(v, self.shadow[k].shape) for k, v in state.items()}  # () scalars of older checkpoints
        for key, shadow in self.shadow.items():
            if state[key].shape != shadow.shape:
                raise ValueError(
                    f"EMA.load_state_dict: '{key}' has shape {tuple(state[key].shape)}, expected {tuple(shadow.shape)}"
                )
        load_full(self.shadow, state)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into `model` (cast to its dtypes and device), e.g. for sampling."""
        unwrap(model).load_state_dict(self.shadow, strict=True)
