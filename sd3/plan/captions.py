"""Token positions a loader's text encoders compute per caption, on a caption-length mix (trimmed or not).

A step of a loader encodes `rows` captions (batch x its consumers), all from one column: `recaption` with probability
data.long_caption_prob, else `recaption_short` (sd3/data/batches.py chooses per step). Untrimmed, one forward pads
every caption to the step's longest; trimmed (encoders.trim_text), length-sorted micro-batches of
encoders.text_micro_batch captions are each padded to their own longest (sd3.encoders.text.padded_tokens counts
both). The expected positions per caption are averaged over simulated steps with a fixed seed, so a plan is
reproducible. The lengths come from pools: token counts of real captions (`sd3 bench balance` tokenizes its shards),
or draws from a normal mix (PlanSettings.caption_tokens_*: the issue's ~60-token `recaption`, ~15-token
`recaption_short`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sd3.encoders.text import padded_tokens

SIMULATED_STEPS = 256  # enough that the mean moves < 1 % between seeds at the presets' 420-caption steps
POOL = 4096  # drawn lengths per column of the normal mix


@dataclass(frozen=True)
class CaptionMix:
    """Token counts of the two caption columns (before truncation), and how often a step uses the long one."""

    long: np.ndarray
    short: np.ndarray
    long_prob: float

    @classmethod
    def normal(cls, long_mean: float, short_mean: float, spread: float, long_prob: float,
               seed: int = 0) -> CaptionMix:
        """Lengths ~ N(mean, (spread·mean)^2), at least 1 token: a stand-in when no captions are at hand."""
        rng = np.random.default_rng(seed)

        def draw(mean: float) -> np.ndarray:
            return np.maximum(1, np.rint(rng.normal(mean, spread * mean, POOL))).astype(np.int64)  # (POOL,)

        return cls(draw(long_mean), draw(short_mean), long_prob)


def tokens_per_caption(mix: CaptionMix, rows: int, max_tokens: int, micro_batch: int, seed: int = 0) -> float:
    """Expected token positions one caption costs a text encoder truncating at `max_tokens`, for steps of `rows`
    captions; micro_batch <= 0: untrimmed (padded to the step's longest)."""
    rng = np.random.default_rng(seed)
    total = 0
    for _ in range(SIMULATED_STEPS):
        pool = mix.long if rng.random() < mix.long_prob else mix.short
        lengths = np.minimum(rng.choice(pool, size=rows), max_tokens)  # (rows,)
        total += padded_tokens(lengths, micro_batch)
    return total / (SIMULATED_STEPS * rows)


def forwards_per_step(rows: int, micro_batch: int) -> int:
    """Forwards of one text encoder in a step of `rows` captions: one untrimmed (micro_batch <= 0), else one per
    length-sorted micro-batch."""
    return 1 if micro_batch <= 0 else math.ceil(rows / micro_batch)


def step_seconds(position_s: float, positions: float, forwards: float, forward_overhead_s: float) -> float:
    """The planner's time of one text encoder's step (or image): a cost per unit of work it computes (a token
    position, or a FLOP) plus a fixed cost per forward (launches, Python, the tokenizer's call;
    PlanSettings.text_forward_overhead_s), which trimming pays once per micro-batch. Counting positions alone would
    credit trimming with the whole padding it removes."""
    return position_s * positions + forward_overhead_s * forwards
