"""Wall-clock time per encoder part, correct on CUDA (kernels run asynchronously, so the clock waits for them)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def timed(timings: dict[str, float] | None, part: str, device: torch.device) -> Iterator[None]:
    """Add the seconds spent in the block to `timings[part]` (cumulative); a no-op when `timings` is None."""
    if timings is None:
        yield
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[part] = timings.get(part, 0.0) + time.perf_counter() - start
