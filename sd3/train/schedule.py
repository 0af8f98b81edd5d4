"""Learning-rate schedule: linear warm-up from 0 to lr, then constant, cosine decay to 0 at total_steps, or
warmup-stable-decay (wsd: constant, then a linear decay to 0 over the last train.lr_decay_fraction of the run).

Source README: "warmup_steps - Number of steps before hitting the learning rate. The warmup period goes from
0 to lr in this number of steps." The source trained with a constant rate after warm-up
(use_lr_scheduler = False); cosine and wsd are the optional alternatives. wsd (Hu et al. 2024, "MiniCPM", §4)
keeps the full rate for most of the run, which a short run needs to learn fast, and still ends at a low rate,
which removes the noise of the last constant-rate steps.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("constant", "cosine", "wsd")


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, decay_fraction: float = 0.2) -> float:
    """Multiplier of the base lr after `step` optimizer steps (the value LambdaLR applies at that step).

    Warm-up as in transformers' get_*_schedule_with_warmup: step / warmup_steps, so step 0 runs at lr 0 and
    step warmup_steps reaches the full lr. Cosine: 0.5·(1 + cos(π·progress)) over [warmup_steps, total_steps],
    0 from total_steps on. wsd: 1 until the last decay_fraction·total_steps steps, then (total_steps − step) /
    those steps, 0 from total_steps on.
    """
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay = max(1, round(decay_fraction * total_steps))
        return min(1.0, max(0.0, (total_steps - step) / decay))
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> LambdaLR:
    """LambdaLR over `optimizer` from train_cfg.warmup_steps, total_steps and lr_schedule (a TrainConfig).

    Call `scheduler.step()` once per optimizer step. The factor is a closure, not a callable object, so the
    scheduler's state_dict holds only its counters: on resume the shape of the schedule comes from the current
    config (e.g. a longer total_steps), the position from the checkpoint.
    """
    schedule = train_cfg.lr_schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"train.lr_schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    warmup, total = int(train_cfg.warmup_steps), int(train_cfg.total_steps)
    if warmup < 0 or total < 1:
        raise ValueError(f"train.warmup_steps ({warmup}) must be >= 0 and train.total_steps ({total}) >= 1")
    decay_fraction = float(train_cfg.lr_decay_fraction)
    if not 0 < decay_fraction <= 1:
        raise ValueError(f"train.lr_decay_fraction must be in (0, 1], got {decay_fraction}")

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total, schedule, decay_fraction)

    return LambdaLR(optimizer, factor)
