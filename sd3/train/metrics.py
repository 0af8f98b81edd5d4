"""What a model rank measures about itself: throughput, stall %, the loader's time split, MFU (ARCHITECTURE §8).

stall % = time spent waiting for the next batch / wall time of the steps in the window. The loader's time split
comes as cumulative seconds per part (decode, text encoders, VAE, send, ...); a window reports each part's share
of the loader's busy time over that window, so it reads the same whatever the log interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets. Matched as substrings of
# torch.cuda.get_device_name(); an unknown device reports MFU as n/a rather than a made-up figure.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A6000": 155e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,  # fp16 tensor cores: V100 has no bf16
}


def peak_flops(device: torch.device) -> float | None:
    """Peak FLOP/s of `device` for bf16 matmuls, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


@dataclass
class Window:
    """Accumulates one log interval of one model rank."""

    steps: int = 0
    images: int = 0
    tokens: int = 0
    flops: float = 0.0
    wait_s: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    loader_start: dict[str, float] = field(default_factory=dict)
    loader_now: dict[str, float] = field(default_factory=dict)
    loader_peak_memory_bytes: int = 0  # the largest peak the source reported in this window

    def add_batch(self, images: int, tokens: int, flops: float, wait_s: float) -> None:
        self.images += images
        self.tokens += tokens
        self.flops += flops
        self.wait_s += wait_s

    def add_loader_timings(self, cumulative: dict[str, float], peak_memory_bytes: int = 0) -> None:
        if not self.loader_start:
            self.loader_start = dict(cumulative)
        self.loader_now = dict(cumulative)
        self.loader_peak_memory_bytes = max(self.loader_peak_memory_bytes, peak_memory_bytes)

    def report(self, peak: float | None) -> dict[str, float | None]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out: dict[str, float | None] = {
            "images_per_s": self.images / elapsed,
            "tokens_per_s": self.tokens / elapsed,
            "stall_pct": 100.0 * self.wait_s / elapsed,
            "step_s": elapsed / max(self.steps, 1),
            "mfu_pct": 100.0 * self.flops / elapsed / peak if peak else None,
        }
        spent = {k: self.loader_now[k] - self.loader_start.get(k, 0.0) for k in self.loader_now}
        busy = sum(spent.values())
        for key, seconds in sorted(spent.items()):
            out[f"loader_{key}_pct"] = 100.0 * seconds / busy if busy > 0 else 0.0
        return out


def format_metrics(values: dict[str, float | int | None]) -> str:
    """`key=value` pairs for the progress bar and the plain log; None prints as n/a (e.g. MFU on a CPU)."""
    parts = []
    for key, value in values.items():
        if value is None:
            parts.append(f"{key}=n/a")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)
