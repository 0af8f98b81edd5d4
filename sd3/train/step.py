"""The pieces of one training step that are not the step itself: RNG streams, precision, the optimizer.

Kept apart from trainer.py so that the step there reads top to bottom without set-up detail.
"""

from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sd3.config import TrainConfig
from sd3.devices import resolve_dtype, resolve_precision_name


def stream_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for the RNG stream named by (seed, keys...), e.g. (seed, step, rank, "noise").

    Every random draw of training comes from such a stream rather than from a global RNG, so a batch's noise
    and timesteps depend only on where it is in the run — the property exact resume relies on.
    """
    words = [int(seed) & 0xFFFFFFFF]
    for key in keys:
        words.append(zlib.crc32(key.encode()) if isinstance(key, str) else int(key) & 0xFFFFFFFF)
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(seed: int, *keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `stream_seed(seed, *keys)`."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, *keys))


@dataclass
class Precision:
    """How the forward runs: autocast dtype (None = plain fp32) and whether a GradScaler is needed (fp16 only)."""

    name: str
    autocast_dtype: torch.dtype | None
    device_type: str

    @property
    def needs_scaler(self) -> bool:
        # bf16 has fp32's exponent range, so gradients do not underflow and need no loss scaling.
        return self.autocast_dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """`bf16` falls back to fp32 (with the reason printed by the caller) on a GPU without bf16 support; `auto` is
    bf16 where the device runs it natively, else fp32 (sd3/devices.py)."""
    name = resolve_precision_name(name, device)
    if name == "fp32":
        return Precision("fp32", None, device.type)
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return Precision("fp32", None, device.type)
    return Precision(name, resolve_dtype(name, "train.precision"), device.type)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only.

    Decaying norm gains, biases and the learnable scalars (the time scale initialised to 1000 and the text
    scalars initialised to 0.01) would pull them towards 0 for no regularisation benefit — they do not grow
    the function's capacity — and for the time scale it would slowly undo its initialisation.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # foreach (not fused) keeps CPU runs deterministic and works on every device.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)

