"""Timing the real architectures on this machine (random weights): what `sd3 plan --measure` and `sd3 bench gpu` use.

Each measurement counts the FLOPs of the very call it times (FlopCounterMode on the first, warm-up, call), so the
result is an achieved FLOP/s that the planner applies to the full-size FLOP counts. On a CPU the parts are built at
their real width but reduced depth (`layers`) and small shapes, which keeps the kernels' sizes and the time short.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sd3.config import ModelConfig
from sd3.model import build_model
from sd3.plan.counting import count
from sd3.plan.encoders import build_part, run_part


@dataclass(frozen=True)
class Measured:
    """One timed call: median seconds over the repeats, the FLOPs it executes, and their ratio."""

    seconds: float
    flops: float
    images: int

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median wall seconds of `fn()` (CUDA kernels awaited); the caller has warmed it up."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_part(part: str, device: torch.device, dtype: torch.dtype, batch: int, tokens: int, height: int,
                 width: int, layers: int | None = None, repeats: int = 3) -> Measured:
    """A loader part's forward on `batch` inputs (text at `tokens`, the VAE at height×width) on `device`."""
    model = build_part(part, device, dtype, layers)

    def forward() -> None:
        with torch.inference_mode():
            run_part(part, model, batch, tokens, height, width)

    flops = count(forward)  # also the warm-up call
    seconds = time_call(forward, device, repeats)
    return Measured(seconds, float(flops), batch)


def measure_mmdit(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, batch: int, height: int, width: int,
                  layers: int | None = None, compile: bool = False, repeats: int = 3) -> Measured:
    """One training forward+backward of the MMDiT (autocast to `dtype`, checkpointing as in `cfg`) on `device`."""
    if layers is not None:
        cfg = dataclasses.replace(cfg, num_blocks=layers)
    model = build_model(cfg).to(device)
    run = torch.compile(model) if compile else model
    f = cfg.vae_downsample
    x = torch.randn(batch, cfg.in_channels, height // f, width // f, device=device)  # (B, C, h, w)
    t = torch.rand(batch, device=device)  # (B,)
    context = torch.randn(batch, 2 * cfg.text_tokens, cfg.context_dim, device=device)  # (B, 2T, D)
    pooled = torch.randn(batch, cfg.pooled_dim, device=device)  # (B, P)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def step() -> None:
        with autocast:
            pred = run(x, t, context, pooled)  # (B, C, h, w)
        pred.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    if compile:
        step()  # compile outside the counter: FlopCounterMode does not see through a compiled graph
    flops = count(step)  # eager counts: the compiled graph executes the same matmuls
    seconds = time_call(step, device, repeats)
    return Measured(seconds, float(flops), batch)
