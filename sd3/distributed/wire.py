"""The wire format of one loader -> model-rank message (ARCHITECTURE §6). Pure: tensors in, tensors out.

Per message, in order on the (loader, consumer) pair:
1. a fixed-size int64 *header* (`StatsLayout.header_len`): magic, version, kind, sequence number (the sampler step),
   the batch's row count, flags (FLAG_STOP_REQUESTED: a stop signal reached the loader), the loader's peak encoder
   memory in bytes while it made this step (CUDA's max_memory_allocated, on CPU its peak RSS), for each Batch tensor its
   dtype code, ndim and shape (up to MAX_NDIM dims), then the loader's statistics: cumulative microseconds per
   timing name and cumulative skipped rows per skip reason, both in the order of the StatsLayout both ends share;
2. kind DATA: the Batch tensors, each of exactly the announced shape and dtype — nothing is padded to the
   largest bucket (the source padded with `inf` so the receiver could guess shapes). Empty tensors are not sent.
   kind ERROR / STOP: one MESSAGE_BYTES uint8 tensor holding the loader's error text (UTF-8, zero-filled).
   kind DONE: nothing; the loader acknowledges a consumer's stop request and sends no more.

The statistics' names are not the wire's business: the caller passes them in (sd3/distributed/stats.py holds the
loader's), so the format does not depend on the data or encoder packages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sd3.batch import Batch
from sd3.distributed.errors import LoaderFailed

MAGIC = 0x5344_3342_4154_4348  # "SD3BATCH"
VERSION = 3  # 2: the header length follows the StatsLayout; receive buffers are owned explicitly. 3: peak memory
DATA, STOP, ERROR, DONE = 1, 2, 3, 4
KIND_NAMES = {DATA: "DATA", STOP: "STOP", ERROR: "ERROR", DONE: "DONE"}
FLAG_STOP_REQUESTED = 1  # SIGTERM/SIGUSR1 reached the loader: the model ranks should agree on a stop step

NUM_TENSORS = 4  # Batch fields: latents, context, pooled, row_ids
MAX_NDIM = 4
MESSAGE_BYTES = 2048
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool)
# gloo matches messages by (peer, tag); NCCL ignores tags and keeps order per pair. Both keep the send order.
DATA_TAG = 17

# Header layout (int64 slots) before the statistics.
_FIXED = 7  # magic, version, kind, step, rows, flags, peak memory bytes
_TENSOR_SLOTS = 2 + MAX_NDIM  # dtype code, ndim, dims
_STATS_AT = _FIXED + NUM_TENSORS * _TENSOR_SLOTS


@dataclass(frozen=True)
class StatsLayout:
    """The names of the statistics a header carries, in wire order; sender and receiver must use the same one.

    timings: cumulative seconds per part (sent as integer microseconds); skips: cumulative skipped rows per reason.
    """

    timings: tuple[str, ...]
    skips: tuple[str, ...]

    @property
    def header_len(self) -> int:
        return _STATS_AT + len(self.timings) + len(self.skips)


@dataclass
class Header:
    kind: int
    step: int
    rows: int
    flags: int
    peak_memory_bytes: int
    specs: list[tuple[torch.dtype, tuple[int, ...]]]  # per Batch tensor
    timings: dict[str, float]
    skipped: dict[str, int]


def encode_header(layout: StatsLayout, kind: int, step: int, batch: Batch | None,
                  timings: dict[str, float] | None = None, skipped: dict[str, int] | None = None,
                  flags: int = 0, peak_memory_bytes: int = 0) -> torch.Tensor:
    """The (layout.header_len,) int64 header announcing `batch` (or nothing, for STOP/ERROR/DONE)."""
    # Built as a Python list and turned into a tensor once: per-slot tensor writes cost ~20x more.
    h = [MAGIC, VERSION, kind, step, len(batch) if batch is not None else 0, flags, int(peak_memory_bytes)]
    tensors = batch.tensors() if batch is not None else [torch.empty(0)] * NUM_TENSORS
    for i, t in enumerate(tensors):
        if t.dim() > MAX_NDIM:
            raise ValueError(f"Batch tensor {i} has {t.dim()} dims; the header holds at most {MAX_NDIM}")
        if t.dtype not in DTYPES:
            raise ValueError(f"Batch tensor {i} has dtype {t.dtype}, which the transport does not carry")
        dims = list(t.shape) if batch is not None else []
        h += [DTYPES.index(t.dtype) if batch is not None else 0, len(dims)] + dims + [0] * (MAX_NDIM - len(dims))
    timings, skipped = timings or {}, skipped or {}
    h += [round(timings.get(k, 0.0) * 1e6) for k in layout.timings]
    h += [int(skipped.get(k, 0)) for k in layout.skips]
    return torch.tensor(h, dtype=torch.int64)  # (header_len,)


def decode_header(layout: StatsLayout, h: torch.Tensor, peer: int) -> Header:
    """Parse a received header; a malformed one raises naming the peer (a version skew or a lost message)."""
    v = h.cpu().tolist()
    if v[0] != MAGIC or v[1] != VERSION:
        raise LoaderFailed(f"rank {peer} sent a malformed batch header (magic {v[0]:#x}, version {v[1]}; "
                           f"expected {MAGIC:#x}, {VERSION}): are both ranks running the same sd3?")
    if v[2] not in KIND_NAMES:
        raise LoaderFailed(f"rank {peer} sent a batch header of unknown kind {v[2]}")
    specs = []
    for i in range(NUM_TENSORS):
        at = _FIXED + i * _TENSOR_SLOTS
        ndim = v[at + 1]
        specs.append((DTYPES[v[at]], tuple(v[at + 2: at + 2 + ndim])))
    skips_at = _STATS_AT + len(layout.timings)
    timings = {k: us / 1e6 for k, us in zip(layout.timings, v[_STATS_AT:skips_at], strict=True)}
    skipped = dict(zip(layout.skips, v[skips_at:layout.header_len], strict=True))
    return Header(kind=v[2], step=v[3], rows=v[4], flags=v[5], peak_memory_bytes=v[6], specs=specs, timings=timings,
                  skipped=skipped)


def encode_message(text: str) -> torch.Tensor:
    """`text` as a (MESSAGE_BYTES,) uint8 tensor, UTF-8, truncated and zero-filled."""
    data = text.encode("utf-8", errors="replace")[:MESSAGE_BYTES]
    msg = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    msg[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return msg


def decode_message(msg: torch.Tensor) -> str:
    return bytes(msg.cpu().tolist()).rstrip(b"\0").decode("utf-8", errors="replace")
