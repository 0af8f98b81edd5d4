"""The planner's assumptions, as a typed dataclass with documented defaults; `--plan.key=value` overrides them.

A part's time is its counted FLOPs / (peak bf16 FLOP/s × its efficiency). The defaults are round figures for a
modern GPU at the presets' batch sizes: matrix products of a 1.2B transformer at large batch reach ~40 % of peak;
the text encoders run short sequences (77 tokens) in inference, a little less; the VAE's convolutions at full
resolution with GroupNorm between them run well below that (issue 12's 25 %). `sd3 plan --measure` replaces them
with what this machine achieves.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

from sd3.errors import ConfigError
from sd3.train.metrics import PEAK_BF16_FLOPS

# --gpu names -> the data-sheet keys of sd3/train/metrics.py (dense bf16 peaks).
GPUS = {key.lower().replace(" ", ""): key for key in PEAK_BF16_FLOPS}


@dataclass
class PlanSettings:
    """What `sd3 plan` assumes about the hardware (every field can be set with --plan.NAME=VALUE)."""

    gpu: str = "h100"
    """A GPU of sd3/train/metrics.py PEAK_BF16_FLOPS (h100, h200, a100, l40s, ...): its dense bf16 peak."""
    gpus_per_node: int = 8
    """GPUs per node; layouts are planned per node and repeated on every node."""
    mmdit_efficiency: float = 0.40
    """Fraction of peak the MMDiT forward+backward achieves on the FLOPs it executes (recompute included)."""
    gemma_efficiency: float = 0.35
    """Fraction of peak of Gemma-2-2B inference at 77 tokens."""
    bert_efficiency: float = 0.35
    """Fraction of peak of ModernBERT-large inference."""
    clip_efficiency: float = 0.30
    """Fraction of peak of the Meta-CLIP text tower (small matrices: 768 wide)."""
    vae_efficiency: float = 0.25
    """Fraction of peak of the FLUX VAE encoder's convolutions."""
    captions: Literal["mix", "full"] = "mix"
    """Caption lengths the text encoders pay for. mix: a step's captions drawn from the caption_tokens_* mix and
    padded as encoders.trim_text / text_micro_batch pad them (sd3/plan/captions.py); full: every caption at
    model.text_tokens (CLIP: its 77-token window), the most a loader can pay."""
    caption_tokens_long: float = 60.0
    """Mean tokens of a `recaption` caption (issue 13: ~60), before truncation at model.text_tokens."""
    caption_tokens_short: float = 15.0
    """Mean tokens of a `recaption_short` caption (issue 13: ~15)."""
    caption_tokens_spread: float = 0.25
    """Standard deviation of a caption's length, as a fraction of its column's mean."""
    text_forward_overhead_s: float = 0.0
    """Seconds each forward of a text encoder costs besides its FLOPs (kernel launches, Python, the tokenizer's
    call), paid once per step untrimmed and once per micro-batch trimmed. 0: FLOPs only. `sd3 bench balance`
    measures it on its encoders (a one-token caption); on a GPU it is of the order of the encoder's depth x its
    kernels per layer x a launch (~5 us)."""
    cache_read_gb_per_s: float = 1.0
    """Hybrid mode: GB/s one loader reads VAE posteriors from data.latent_cache (a shared network filesystem's
    per-client rate, conservatively; a local NVMe does several times more). Drawing the latent from the posterior
    is one multiply-add per element, left out."""
    max_stall_pct: float = 5.0
    """The recommended layout is the fastest per GPU among those predicted to stall at most this much."""

    def efficiency(self, part: str) -> float:
        return getattr(self, f"{part}_efficiency")

    @property
    def peak_flops(self) -> float:
        key = self.gpu.lower().replace(" ", "")
        if key not in GPUS:
            raise ConfigError(f"plan.gpu '{self.gpu}' is not a known GPU ({', '.join(sorted(GPUS))})")
        return PEAK_BF16_FLOPS[GPUS[key]]


def apply_plan_overrides(settings: PlanSettings, overrides: list[str]) -> list[str]:
    """Apply the `--plan.key=value` items of `overrides` to `settings`; return the other items (config overrides)."""
    rest = []
    hints = typing.get_type_hints(PlanSettings)
    names = {f.name for f in dataclasses.fields(PlanSettings)}
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if not text.startswith("plan."):
            rest.append(item)
            continue
        key, _, raw = text[len("plan."):].partition("=")
        if key not in names:
            raise ConfigError(f"unknown plan setting 'plan.{key}' (settings: {', '.join(sorted(names))})")
        choices = typing.get_args(hints[key]) if typing.get_origin(hints[key]) is Literal else ()
        if choices:
            if raw not in choices:
                raise ConfigError(f"plan.{key} must be one of {', '.join(choices)}, got {raw!r}")
            setattr(settings, key, raw)
            continue
        try:
            value = hints[key](raw)
        except ValueError:
            raise ConfigError(f"plan.{key} expects {hints[key].__name__}, got {raw!r}") from None
        if isinstance(value, float) and key.endswith("_efficiency") and not 0 < value <= 1:
            raise ConfigError(f"plan.{key} must be in (0, 1], got {value}")
        if key.startswith(("caption_tokens_", "cache_read_")) and value <= 0:
            raise ConfigError(f"plan.{key} must be > 0, got {value}")
        if key == "text_forward_overhead_s" and value < 0:
            raise ConfigError(f"plan.{key} must be >= 0, got {value}")
        setattr(settings, key, value)
    return rest
