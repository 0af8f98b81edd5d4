"""FLOPs of the real architectures, counted by torch's FlopCounterMode on the meta device (no weights, offline).

Two snags of torch 2.13 are handled here:
- FlopCounterMode has no formula for the CPU flash-attention kernels (`_scaled_dot_product_flash_attention_for_cpu`
  and its backward), so SDPA on a CPU counted 0; torch's own SDPA formulas are registered for them.
- The MMDiT's `per_sample()` opens `torch.autocast(x.device.type)`, and torch rejects `autocast("meta")`. Until
  sd3/model/mmdit.py handles the meta device itself, `meta_safe_per_sample()` swaps in a copy that skips autocast on
  meta (nothing is cast there anyway: meta tensors hold no values), only while counting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from sd3.config import ModelConfig
from sd3.model import build_model
from sd3.model import mmdit as mmdit_module
from sd3.plan.encoders import build_part, run_part

_aten = torch.ops.aten


def _register_cpu_sdpa() -> None:
    if _aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)
    def _forward(query, key, value, *args, out_val=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)

    @flop_counter.register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward, get_raw=True)
    def _backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_register_cpu_sdpa()


def _per_sample_meta(fn: Callable, like: torch.Tensor, cast: bool = True):
    if like.device.type == "meta":
        return fn()
    return _ORIGINAL_PER_SAMPLE(fn, like, cast)


_ORIGINAL_PER_SAMPLE = mmdit_module.per_sample


@contextlib.contextmanager
def meta_safe_per_sample() -> Iterator[None]:
    """Let the MMDiT run on meta tensors (see the module docstring); restores the original on exit."""
    mmdit_module.per_sample = _per_sample_meta
    try:
        yield
    finally:
        mmdit_module.per_sample = _ORIGINAL_PER_SAMPLE


def count(fn: Callable[[], object]) -> int:
    """Total FLOPs FlopCounterMode sees while `fn()` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class MMDiTFlops:
    """FLOPs of one forward+backward of the MMDiT for one image.

    model: forward + backward, the figure MFU is quoted in (and `sd3 info` estimates);
    executed: what the device runs, i.e. plus the forward recompute of activation checkpointing as configured.
    """

    model: float
    executed: float


def mmdit_flops(cfg: ModelConfig, height: int, width: int, batch: int = 1) -> MMDiTFlops:
    """Count the MMDiT at height×width px on the meta device, without and with the configured checkpointing."""
    with meta_safe_per_sample():
        plain = _count_mmdit(cfg, height, width, batch, checkpointing=False)
        executed = _count_mmdit(cfg, height, width, batch, checkpointing=True)
    return MMDiTFlops(plain / batch, executed / batch)


def _count_mmdit(cfg: ModelConfig, height: int, width: int, batch: int, checkpointing: bool) -> int:
    with torch.device("meta"):
        model = build_model(cfg)
    if not checkpointing:
        for block in model.blocks:
            block.checkpoint_attn = block.checkpoint_mlp = False
    f = cfg.vae_downsample
    with torch.device("meta"):
        x = torch.zeros(batch, cfg.in_channels, height // f, width // f)  # (B, C, h, w)
        t = torch.zeros(batch)  # (B,)
        context = torch.zeros(batch, 2 * cfg.text_tokens, cfg.context_dim)  # (B, 2T, D)
        pooled = torch.zeros(batch, cfg.pooled_dim)  # (B, P)

    def step() -> None:
        model(x, t, context, pooled).float().square().mean().backward()

    return count(step)


def part_flops(part: str, tokens: int, height: int, width: int, layers: int | None = None,
               folder: Path | None = None) -> float:
    """FLOPs per image of one loader part (forward only, inference): text at `tokens`, the VAE at height×width.
    folder: a local model folder to read the architecture from (None: the shipped configuration)."""
    model = build_part(part, "meta", layers=layers, folder=folder)

    def forward() -> None:
        with torch.inference_mode():
            run_part(part, model, 1, tokens, height, width)

    return float(count(forward))
