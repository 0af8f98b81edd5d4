"""What a loader reports with every batch: the names of its statistics (the wire's StatsLayout) and LoaderStats.

The names live here, where the loader and its receivers meet, rather than in the wire format: the timing parts are
the loader's ("decode" by the RowLoader, the Conditioner's PARTS, "send"/"wait" by the BatchSender) and the skip
reasons the RowLoader's (sd3/data/batches.py). tests/distributed/test_stats.py checks they agree with those modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sd3.data.batches import SKIP_REASONS
from sd3.distributed.wire import StatsLayout

TIMING_FIELDS = ("decode", "gemma", "bert", "clip", "vae", "send", "wait")  # loader seconds, cumulative
LOADER_STATS = StatsLayout(timings=TIMING_FIELDS, skips=tuple(SKIP_REASONS))


@dataclass
class LoaderStats:
    """What the loader reports with each batch (cumulative since it started) plus this rank's wait for it."""

    loader_rank: int
    step: int
    rows: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per TIMING_FIELDS part, cumulative
    skipped: dict[str, int] = field(default_factory=dict)  # rows per SKIP_REASONS, cumulative
    wait_s: float = 0.0  # seconds this model rank waited in next() for this batch (stall numerator)
    nbytes: int = 0  # payload bytes received
    stop_requested: bool = False  # a stop signal reached the loader (FLAG_STOP_REQUESTED)
    peak_memory_bytes: int = 0  # the loader's peak encoder memory while it made this step
