"""Wall-clock time per encoder part, correct on CUDA (kernels run asynchronously, so the clock must wait for them).

On CUDA the part is bracketed by two events on the current stream and the host waits for the second one only: a
device-wide `torch.cuda.synchronize()` would also wait for the loader's in-flight NCCL sends, so step k+1 would
not be encoded until every consumer took step k, the encoder's time would include waiting for consumers, and a
dead consumer would leave the loader stuck in C++ until the watchdog (issue 18 item 1).
"""

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
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        end.synchronize()  # this stream's work up to here, not the NCCL streams'
        seconds = start.elapsed_time(end) / 1000.0  # elapsed_time is in milliseconds
    else:
        begin = time.perf_counter()
        yield
        seconds = time.perf_counter() - begin
    timings[part] = timings.get(part, 0.0) + seconds
