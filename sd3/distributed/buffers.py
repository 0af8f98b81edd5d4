"""Where received batches land on the CPU: tensors laid out in a few reused flat buffers, with explicit ownership.

A fresh 100 MB tensor costs ~10x a reused one on the CPU (every page is faulted in on first touch), which would
double the transport time of a reference-size batch. So the receiver takes a *lease* on a buffer for each batch
and hands it back when the batch is done; a buffer is reused only after its lease was released. The contract
(BatchReceiver): a batch returned by `next()` stays valid until the following `next()` (or stop/fail/close),
which releases it — a consumer that keeps tensors longer clones them.

On CUDA the caching allocator already reuses memory (and record_stream keeps it from being reused while the
compute stream still reads it), so a lease there is only its tensors.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch


@dataclass
class Lease:
    """Tensors of one received batch, in one pool buffer until `release()` hands that buffer back."""

    tensors: list[torch.Tensor]
    _pool: ReceiveBuffers | None = None
    _buffer: torch.Tensor | None = field(default=None, repr=False)

    def release(self) -> None:
        """Give the buffer back to the pool; the tensors must not be used afterwards. Idempotent."""
        if self._pool is not None and self._buffer is not None:
            self._pool._give_back(self._buffer)
        self._pool = self._buffer = None


class ReceiveBuffers:
    """A pool of flat uint8 buffers on `device`; `acquire(specs)` leases one laid out as tensors of those specs.

    keep: how many idle buffers to hold on to (the batch in the trainer's hands, the one in the queue, the one
    being received are leased; released ones beyond `keep` are dropped so memory follows the largest recent batch).
    Thread-safe: the receiving thread acquires, the trainer's thread releases.
    """

    ALIGN = 64  # bytes; each tensor starts aligned inside its buffer (the wire carries no padding)
    KEEP = 3

    def __init__(self, device: torch.device, keep: int = KEEP):
        self.device = device
        self.keep = keep
        self.idle: list[torch.Tensor] = []  # released buffers, ready for reuse
        self.leased = 0  # buffers handed out and not yet given back
        self.allocated = 0  # buffers created since the start (reuse shows as allocated staying small)
        self._lock = threading.Lock()

    def _take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [b for b in self.idle if b.numel() >= nbytes]
            buf = min(fits, key=torch.Tensor.numel) if fits else None
            if buf is not None:
                self.idle = [b for b in self.idle if b is not buf]
            elif self.idle:
                self.idle.pop(0)  # too small for today's batch: drop one so the pool does not grow
            self.leased += 1
            self.allocated += buf is None
        return buf if buf is not None else torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _give_back(self, buf: torch.Tensor) -> None:
        with self._lock:
            self.leased -= 1
            self.idle = (self.idle + [buf])[-self.keep:]

    def acquire(self, specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> Lease:
        """A lease on empty tensors of exactly these dtypes and shapes."""
        if self.device.type != "cpu":
            return Lease([torch.empty(shape, dtype=dtype, device=self.device) for dtype, shape in specs])
        sizes = [math.prod(shape) * dtype.itemsize for dtype, shape in specs]
        offsets, end = [], 0
        for size in sizes:
            offsets.append(end)
            end += -(-size // self.ALIGN) * self.ALIGN
        buf = self._take(max(end, 1))
        tensors = [buf[o: o + n].view(dtype).view(shape) for o, n, (dtype, shape) in zip(offsets, sizes, specs,
                                                                                          strict=True)]
        return Lease(tensors, self, buf)
