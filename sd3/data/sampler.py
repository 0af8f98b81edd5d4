"""The bucket batch sampler: which rows a loader rank reads at each step (ARCHITECTURE §4).

Every batch comes from one bucket, so all its images have one exact size and nothing is padded or cropped.
`batch(step)` is a pure function of (seed, layout, data position): a resumed run, or a re-run of the same step,
gets the same rows and the same per-step seed.

The schedule is global — one for all loaders — and each loader reads its slice of it. One *epoch* (a pass over the
data):
1. each kept bucket's rows are permuted with a generator shared by all loaders (seed, epoch, bucket);
2. the permutation is cut into chunks of one *global batch* (the rows all loaders read in one step, i.e. the sum of
   `loader_rows`); the last chunk of a bucket may be smaller;
3. the chunks of all buckets are shuffled together (seed, epoch). A uniform shuffle of the chunks picks the next
   bucket with probability proportional to its remaining chunks — its remaining size;
4. at step k every loader reads chunk k: loader i takes the consecutive rows at its offset (`loader_rows[i]` of
   them; a short last chunk is shared in proportion). So within an epoch no row is read twice or skipped, and every
   model rank trains on the same bucket at the same step (DDP ranks wait on no larger image);
5. in epoch 0 the first batch is moved to come from the largest bucket (most pixels per image), so the first
   step allocates the largest activations and later steps reuse that memory.
Buckets with fewer rows than `min_bucket_size` (0 = one global batch) are dropped and logged.

Elastic resume (mosaicml streaming's guarantee: nothing missing or repeated within the epoch). The data position
saved in a checkpoint is the step, the epoch, and — for an epoch that began under another layout — how many rows of
each bucket's permutation were consumed before the layout changed (a *cursor* per bucket). Resumed with another
layout (more or fewer loaders, another per-rank batch, another data mode), the sampler takes the cursors at the saved
step and plans the rest of that epoch under the new layout: the remaining rows of each bucket, re-chunked and
re-shuffled (seed, epoch, resume step). Later epochs are planned as usual. Resumed with the same layout, the stream
continues identically.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sd3.data.index import BucketIndex
from sd3.seeds import numpy_rng, stream_seed

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Uses of one step's randomness downstream (SamplerBatch.seed(purpose)).
PURPOSE_CAPTIONS, PURPOSE_VAE, PURPOSE_CFG, PURPOSE_TIMESTEPS = 1, 2, 3, 4
STATE_VERSION = 2


@dataclass(frozen=True)
class SamplerBatch:
    """One step of one loader: `row_ids` (int64) all from `bucket` ("HxW"), images of exactly height x width.

    seed_for_step drives everything random done for this step downstream (caption choice and cleaning,
    VAE sampling noise, CFG dropout), so a replayed step is the same step.
    """

    step: int
    bucket: str
    height: int
    width: int
    row_ids: np.ndarray
    seed_for_step: int

    def seed(self, purpose: int) -> int:
        """An independent 63-bit seed for one use (`purpose`, e.g. PURPOSE_VAE) of this step's randomness."""
        return stream_seed(self.seed_for_step, "purpose", purpose)

    def numpy_rng(self, purpose: int) -> np.random.Generator:
        return numpy_rng(self.seed_for_step, "purpose", purpose)

    def torch_generator(self, purpose: int, device: str = "cpu") -> torch.Generator:
        import torch

        return torch.Generator(device).manual_seed(self.seed(purpose))


@dataclass(frozen=True)
class _Segment:
    """Where the planned stream restarts: `epoch` begins (cursors None) or resumes at `start_step`."""

    start_step: int
    epoch: int
    cursors: tuple[tuple[int, int], ...] | None = None  # (bucket number, rows of its permutation consumed)


@dataclass
class _Plan:
    """The batches of one epoch (or of the rest of one, after an elastic resume) under one layout."""

    remaining: list[np.ndarray]  # per planned bucket: its rows still to read this epoch, in permuted order
    buckets: np.ndarray  # (n,) bucket numbers in the index of `remaining`
    consumed: np.ndarray  # (n,) rows of each bucket's permutation read before this plan starts
    bucket_of_batch: np.ndarray  # (batches,) position in `buckets` of each batch
    chunk_of_batch: np.ndarray  # (batches,) which chunk of that bucket's `remaining`


class _Schedule:
    """The global schedule of one layout: plans epochs and the segment a resume started, maps steps to chunks."""

    def __init__(self, index: BucketIndex, seed: int, loader_rows: tuple[int, ...], threshold: int, segment: _Segment):
        self.index, self.seed, self.loader_rows, self.segment = index, seed, loader_rows, segment
        self.global_batch = int(sum(loader_rows))
        self.threshold = threshold
        self.kept = np.flatnonzero(index.counts >= threshold)
        self.chunks = -(-index.counts[self.kept] // self.global_batch)  # ceil: chunks per kept bucket, fresh epoch
        self.batches_per_epoch = int(self.chunks.sum())
        sizes = index.sizes
        pixels = np.array([sizes[int(b)][0] * sizes[int(b)][1] for b in self.kept])
        # "Largest" for memory: the most pixels per image (then the most rows).
        self.largest = int(self.kept[np.lexsort((-index.counts[self.kept], -pixels))[0]]) if len(self.kept) else -1
        self._plans: dict[int, _Plan] = {}
        self._segment_plan = self._make_plan(segment) if segment.cursors is not None else None

    def permutation(self, epoch: int, bucket: int) -> np.ndarray:
        rng = numpy_rng(self.seed, "permute", epoch, bucket)  # the same on every loader
        return rng.permutation(self.index.rows(bucket))

    def _make_plan(self, segment: _Segment) -> _Plan:
        epoch = segment.epoch
        if segment.cursors is None:
            buckets, consumed = self.kept, np.zeros(len(self.kept), dtype=np.int64)
            order_rng = numpy_rng(self.seed, "order", epoch)
        else:
            buckets = np.array([b for b, _ in segment.cursors], dtype=np.int64)
            consumed = np.array([c for _, c in segment.cursors], dtype=np.int64)
            order_rng = numpy_rng(self.seed, "order", epoch, "resumed at", segment.start_step)
        remaining = [self.permutation(epoch, int(b))[int(c):] for b, c in zip(buckets, consumed, strict=True)]
        chunks = np.array([-(-len(r) // self.global_batch) for r in remaining], dtype=np.int64)
        bucket_of_batch = np.repeat(np.arange(len(buckets)), chunks)
        order_rng.shuffle(bucket_of_batch)
        if epoch == 0 and segment.cursors is None and len(bucket_of_batch):
            first = int(np.flatnonzero(buckets[bucket_of_batch] == self.largest)[0])
            bucket_of_batch[[0, first]] = bucket_of_batch[[first, 0]]
        # The k-th batch of a bucket in this plan takes its k-th chunk: rank of each batch among its bucket's.
        order = np.argsort(bucket_of_batch, kind="stable")
        starts = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64)
        chunk_of_batch = np.empty_like(bucket_of_batch)
        chunk_of_batch[order] = np.arange(len(order)) - starts[bucket_of_batch[order]]
        return _Plan(remaining, buckets, consumed, bucket_of_batch, chunk_of_batch)

    def locate(self, step: int) -> tuple[int, _Plan, int]:
        """(epoch, plan, position in the plan) of a step at or after the segment's start."""
        seg = self.segment
        if step < seg.start_step:
            raise ValueError(f"step {step} comes before this run's data position (step {seg.start_step})")
        offset = step - seg.start_step
        if self._segment_plan is not None:
            if offset < len(self._segment_plan.bucket_of_batch):
                return seg.epoch, self._segment_plan, offset
            offset -= len(self._segment_plan.bucket_of_batch)
            first_fresh = seg.epoch + 1
        else:
            first_fresh = seg.epoch
        if self.batches_per_epoch == 0:
            raise ValueError("no bucket is kept: nothing to plan")
        epoch = first_fresh + offset // self.batches_per_epoch
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}  # keep at most two epochs
            self._plans[epoch] = self._make_plan(_Segment(0, epoch))
        return epoch, self._plans[epoch], offset % self.batches_per_epoch

    def chunk(self, step: int) -> tuple[int, int, np.ndarray]:
        """(epoch, bucket number, the global batch of rows) of a step."""
        epoch, plan, pos = self.locate(step)
        k, c = int(plan.bucket_of_batch[pos]), int(plan.chunk_of_batch[pos])
        return epoch, int(plan.buckets[k]), plan.remaining[k][c * self.global_batch : (c + 1) * self.global_batch]

    def cursors_at(self, step: int) -> tuple[int, tuple[tuple[int, int], ...] | None]:
        """(epoch, cursors) at `step`: rows of each planned bucket consumed by steps before it (None: epoch start)."""
        epoch, plan, pos = self.locate(step)
        if pos == 0 and plan is not self._segment_plan:
            return epoch, None
        read = plan.consumed.copy()
        for k, c in zip(plan.bucket_of_batch[:pos], plan.chunk_of_batch[:pos], strict=True):
            read[k] += len(plan.remaining[k][c * self.global_batch : (c + 1) * self.global_batch])
        return epoch, tuple((int(b), int(n)) for b, n in zip(plan.buckets, read, strict=True))


def split_rows(n: int, loader_rows: Sequence[int]) -> list[int]:
    """How many of a chunk's `n` rows each loader reads: its full share, or in proportion for a short chunk (largest
    remainders first, ties to the lower loader), so the shares of every chunk sum to `n`."""
    total = sum(loader_rows)
    if n >= total:
        return list(loader_rows)
    exact = [n * r / total for r in loader_rows]
    sizes = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: (sizes[i] - exact[i], i))[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


class BucketBatchSampler:
    """Batches of row ids, one bucket per batch, deterministic and resumable, also across a change of layout.

    index: the BucketIndex of the shard folder. global_batch: rows per step of this loader (per-rank batch x
    the model ranks it feeds). seed: the data seed. loader_index / num_loaders: this loader among all loader
    ranks (their rows are disjoint). loader_rows: rows per step of every loader, for uneven layouts (default:
    `global_batch` for each). min_bucket_size: buckets with fewer rows are dropped; 0 means one global batch of all
    loaders together.
    """

    def __init__(
        self,
        index: BucketIndex,
        global_batch: int,
        seed: int = 0,
        loader_index: int = 0,
        num_loaders: int = 1,
        min_bucket_size: int = 0,
        loader_rows: Sequence[int] | None = None,
    ):
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if not 0 <= loader_index < num_loaders:
            raise ValueError(f"loader_index {loader_index} not in [0, {num_loaders})")
        rows = tuple(int(r) for r in loader_rows) if loader_rows is not None else (int(global_batch),) * num_loaders
        if len(rows) != num_loaders or rows[loader_index] != global_batch or min(rows) < 1:
            raise ValueError(f"loader_rows {list(rows)} does not fit {num_loaders} loaders with "
                             f"loader {loader_index} reading {global_batch} rows per step")
        self.index = index
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.loader_index = int(loader_index)
        self.num_loaders = int(num_loaders)
        self.loader_rows = rows
        self.min_bucket_size = int(min_bucket_size)
        self.threshold = self.min_bucket_size if self.min_bucket_size > 0 else sum(rows)
        self.step = 0  # the next step `next()` returns
        self.resumed: str | None = None  # how load_state_dict continued: "exact", "elastic" or "restarted"
        self._schedule = self._new_schedule(_Segment(0, 0))

        small = np.flatnonzero(index.counts < self.threshold)
        if len(small):
            names = ", ".join(f"{index.buckets[i]} ({index.counts[i]} rows)" for i in small[:20])
            more = f" and {len(small) - 20} more" if len(small) > 20 else ""
            dropped = int(index.counts[small].sum())
            log.warning(
                "sampler: dropping %d of %d buckets (%d rows, %.2f%%) below %d rows: %s%s",
                len(small), len(index.buckets), dropped, 100 * dropped / max(1, index.num_rows), self.threshold,
                names, more,
            )
        else:
            log.info("sampler: all %d buckets kept (threshold %d rows)", len(index.buckets), self.threshold)
        if len(self.kept) == 0:
            raise ValueError(
                f"no bucket has >= {self.threshold} rows (largest bucket "
                f"{int(index.counts.max()) if len(index.counts) else 0} rows); "
                "lower data.min_bucket_size or the batch size"
            )
        self.rows_per_epoch = int(index.counts[self.kept].sum())  # all loaders together

    def _new_schedule(self, segment: _Segment) -> _Schedule:
        return _Schedule(self.index, self.seed, self.loader_rows, self.threshold, segment)

    @property
    def kept(self) -> np.ndarray:
        return self._schedule.kept

    @property
    def batches_per_epoch(self) -> int:
        """Steps in a full epoch under this layout (an epoch resumed under another layout may be shorter)."""
        return self._schedule.batches_per_epoch

    def seed_for_step(self, step: int) -> int:
        return stream_seed(self.seed, "step", self.loader_index, step)

    def batch(self, step: int) -> SamplerBatch:
        """This loader's batch of `step` (0-based), independent of any state but the data position resumed from."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        _, bucket, rows = self._schedule.chunk(int(step))
        sizes = split_rows(len(rows), self.loader_rows)
        start = sum(sizes[: self.loader_index])
        mine = rows[start : start + sizes[self.loader_index]]
        name = self.index.buckets[bucket]
        height, width = (int(v) for v in name.split("x"))
        return SamplerBatch(int(step), name, height, width, mine.astype(np.int64), self.seed_for_step(step))

    def next(self) -> SamplerBatch:
        """The batch at the current step, then advance."""
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[SamplerBatch]:
        while True:
            yield self.next()

    def epoch_of(self, step: int) -> int:
        return self._schedule.locate(step)[0]

    def state_dict(self) -> dict[str, Any]:
        """The data position at `self.step`, the same for every loader; plain ints and lists (weights_only-safe)."""
        seg = self._schedule.segment
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "seed": self.seed,
            "num_rows": self.index.num_rows,
            "num_buckets": len(self.index.buckets),
            "loader_rows": list(self.loader_rows),
            "threshold": self.threshold,
            "segment_start": seg.start_step,
            "segment_epoch": seg.epoch,
            "segment_resumed": int(seg.cursors is not None),
            "segment_cursors": [list(c) for c in seg.cursors or ()],
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> str:
        """Continue from a saved data position; returns how: "exact" (same layout: the same stream), "elastic"
        (another layout: the rest of the epoch re-planned, nothing missed or repeated) or "restarted" (strict=False
        with other data: the saved step is kept and a new pass begins there).

        Another seed, other data or a state from before elastic resume is refused when strict.
        """
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"sampler state has step {step} < 0")
        problems = []
        if int(state.get("version", 1)) != STATE_VERSION:
            version = state.get("version", 1)
            problems.append(f"it is sampler state version {version}, this sampler reads {STATE_VERSION}")
        for key in ("seed", "num_rows", "num_buckets"):
            mine = int(self.state_dict()[key])
            if key not in state or int(state[key]) != mine:
                problems.append(f"it was saved with {key}={state.get(key, 'nothing')}, this run has {key}={mine}")
        if problems:
            message = "sampler state cannot continue the data stream: " + "; ".join(problems)
            if strict:
                raise ValueError(message)
            log.warning("%s; a new pass over the data begins at step %d", message, step)
            self._schedule = self._new_schedule(_Segment(step, 0))
            self.step = step
            self.resumed = "restarted"
            return self.resumed
        cursors = tuple((int(b), int(c)) for b, c in state["segment_cursors"])
        saved = _Segment(int(state["segment_start"]), int(state["segment_epoch"]),
                         cursors if int(state["segment_resumed"]) else None)
        old_rows = tuple(int(r) for r in state["loader_rows"])
        if sum(old_rows) == sum(self.loader_rows) and int(state["threshold"]) == self.threshold:
            # Same global schedule (the loaders' split of a chunk may differ: still no row missed or repeated).
            self._schedule = self._new_schedule(saved)
            how = "exact" if old_rows == self.loader_rows else "elastic"
        else:
            old = _Schedule(self.index, self.seed, old_rows, int(state["threshold"]), saved)
            epoch, at = old.cursors_at(step)
            self._schedule = self._new_schedule(_Segment(step, epoch, at))
            how = "elastic"
        self.step = step
        self.resumed = how
        if how == "elastic":
            log.info("sampler: layout %s -> %s at step %d: the rest of the epoch is re-planned",
                     list(old_rows), list(self.loader_rows), step)
        return how
