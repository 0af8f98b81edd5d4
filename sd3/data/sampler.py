"""The bucket batch sampler: which rows a loader rank reads at each step (ARCHITECTURE §4).

Every batch comes from one bucket, so all its images have one exact size and nothing is padded or cropped.
`batch(step)` is a pure function of (seed, loader_index, step): a resumed run, or a re-run of the same step,
gets the same rows and the same per-step seed.

One *epoch* (a pass over the data) of one loader:
1. each kept bucket's rows are permuted with a generator shared by all loaders (seed, epoch, bucket), and
   loader k takes every num_loaders-th row starting at k, so loaders never share a row within an epoch;
   every loader's share is cut to the same length (len // num_loaders), dropping at most num_loaders - 1
   rows per bucket per epoch (different ones each epoch), so all loaders have the same epoch length;
2. the share is cut into chunks of `global_batch` rows (the last chunk of a bucket may be smaller);
3. the chunks of all buckets are shuffled together (seed, loader, epoch). A uniform shuffle of the chunks picks
   the next bucket with probability proportional to its remaining chunks — its remaining size;
4. in epoch 0 the first batch is moved to come from the largest bucket (most pixels per image), so the first
   step allocates the largest activations and later steps reuse that memory.
Buckets whose share is smaller than `min_bucket_size` (0 = the global batch size) are dropped and logged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
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


@dataclass
class _EpochPlan:
    shares: list[np.ndarray]  # per kept bucket: this loader's permuted rows
    bucket_of_batch: np.ndarray  # (batches_per_epoch,) kept-bucket number of each batch
    chunk_of_batch: np.ndarray  # (batches_per_epoch,) which chunk of that bucket


class BucketBatchSampler:
    """Batches of row ids, one bucket per batch, deterministic and resumable.

    index: the BucketIndex of the shard folder. global_batch: rows per step of this loader (per-rank batch x
    the model ranks it feeds). seed: the data seed. loader_index / num_loaders: this loader among all loader
    ranks (their streams are disjoint). min_bucket_size: buckets whose per-loader share has fewer rows are
    dropped; 0 means global_batch.
    """

    def __init__(
        self,
        index: BucketIndex,
        global_batch: int,
        seed: int = 0,
        loader_index: int = 0,
        num_loaders: int = 1,
        min_bucket_size: int = 0,
    ):
        if global_batch < 1:
            raise ValueError(f"global_batch must be >= 1, got {global_batch}")
        if not 0 <= loader_index < num_loaders:
            raise ValueError(f"loader_index {loader_index} not in [0, {num_loaders})")
        self.index = index
        self.global_batch = int(global_batch)
        self.seed = int(seed)
        self.loader_index = int(loader_index)
        self.num_loaders = int(num_loaders)
        self.min_bucket_size = int(min_bucket_size)
        self.threshold = self.min_bucket_size if self.min_bucket_size > 0 else self.global_batch
        self.step = 0  # the next step `next()` returns

        share = index.counts // self.num_loaders  # rows per loader per epoch, per bucket
        self.kept = np.flatnonzero(share >= self.threshold)  # bucket numbers in the index
        small = np.flatnonzero(share < self.threshold)
        if len(small):
            names = ", ".join(f"{index.buckets[i]} ({index.counts[i]} rows)" for i in small[:20])
            more = f" and {len(small) - 20} more" if len(small) > 20 else ""
            rows = int(index.counts[small].sum())
            log.warning(
                "sampler: dropping %d of %d buckets (%d rows, %.2f%%) whose share per loader (rows // %d loaders) "
                "is below %d rows: %s%s",
                len(small), len(index.buckets), rows, 100 * rows / max(1, index.num_rows), self.num_loaders,
                self.threshold, names, more,
            )
        else:
            log.info("sampler: all %d buckets kept (threshold %d rows per loader)", len(index.buckets), self.threshold)
        if len(self.kept) == 0:
            raise ValueError(
                f"no bucket has >= {self.threshold} rows per loader ({self.num_loaders} loaders, largest bucket "
                f"{int(index.counts.max()) if len(index.counts) else 0} rows); lower data.min_bucket_size or the batch size"
            )
        self.share_sizes = share[self.kept]
        self.chunks = -(-self.share_sizes // self.global_batch)  # ceil: chunks per kept bucket
        self.batches_per_epoch = int(self.chunks.sum())
        self.rows_per_epoch = int(self.share_sizes.sum())
        # "Largest" for memory: the most pixels per image (then the most rows), so the first step allocates
        # the biggest activations and later steps reuse them.
        sizes = index.sizes
        pixels = np.array([sizes[int(b)][0] * sizes[int(b)][1] for b in self.kept])
        self.largest = int(np.lexsort((-self.share_sizes, -pixels))[0])  # position among kept buckets
        self._plans: dict[int, _EpochPlan] = {}

    def _plan(self, epoch: int) -> _EpochPlan:
        if epoch in self._plans:
            return self._plans[epoch]
        shares = []
        for b, size in zip(self.kept, self.share_sizes):
            rng = numpy_rng(self.seed, "permute", epoch, int(b))  # same on every loader
            perm = rng.permutation(self.index.rows(int(b)))
            shares.append(perm[self.loader_index :: self.num_loaders][:size])
        bucket_of_batch = np.repeat(np.arange(len(self.kept)), self.chunks)
        numpy_rng(self.seed, "order", self.loader_index, epoch).shuffle(bucket_of_batch)
        if epoch == 0:
            first = int(np.flatnonzero(bucket_of_batch == self.largest)[0])
            bucket_of_batch[[0, first]] = bucket_of_batch[[first, 0]]
        # The k-th batch of a bucket in this epoch takes its k-th chunk: rank of each batch among its bucket's.
        order = np.argsort(bucket_of_batch, kind="stable")
        starts = np.concatenate([[0], np.cumsum(self.chunks)[:-1]])
        chunk_of_batch = np.empty_like(bucket_of_batch)
        chunk_of_batch[order] = np.arange(len(order)) - starts[bucket_of_batch[order]]
        plan = _EpochPlan(shares, bucket_of_batch, chunk_of_batch)
        self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}  # keep at most two epochs
        self._plans[epoch] = plan
        return plan

    def seed_for_step(self, step: int) -> int:
        return stream_seed(self.seed, "step", self.loader_index, step)

    def batch(self, step: int) -> SamplerBatch:
        """The batch of `step` (0-based), independent of any state."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, pos = divmod(int(step), self.batches_per_epoch)
        plan = self._plan(epoch)
        k = int(plan.bucket_of_batch[pos])
        c = int(plan.chunk_of_batch[pos])
        rows = plan.shares[k][c * self.global_batch : (c + 1) * self.global_batch]
        name = self.index.buckets[int(self.kept[k])]
        height, width = (int(v) for v in name.split("x"))
        return SamplerBatch(int(step), name, height, width, rows.astype(np.int64), self.seed_for_step(step))

    def next(self) -> SamplerBatch:
        """The batch at the current step, then advance."""
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[SamplerBatch]:
        while True:
            yield self.next()

    def epoch_of(self, step: int) -> int:
        return step // self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Plain ints only (safe for torch.load(weights_only=True))."""
        return {
            "step": self.step,
            "seed": self.seed,
            "loader_index": self.loader_index,
            "num_loaders": self.num_loaders,
            "global_batch": self.global_batch,
            "threshold": self.threshold,
            "num_rows": self.index.num_rows,
            "num_buckets": len(self.index.buckets),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Continue from a saved state. A state saved with other settings or data is refused (strict), or only
        its step is taken with a warning (strict=False: e.g. data was added on purpose)."""
        mine = self.state_dict()
        for key, value in mine.items():
            if key == "step":
                continue
            if key not in state or int(state[key]) != value:
                message = (
                    f"sampler state was saved with {key}={state.get(key, 'nothing')}, this run has {key}={value}: "
                    "the data stream cannot continue identically"
                )
                if strict:
                    raise ValueError(message)
                log.warning("%s; continuing from step %s anyway", message, state.get("step"))
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"sampler state has step {step} < 0")
        self.step = step
