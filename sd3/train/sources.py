"""Where a model rank's micro-batches come from. Three sources, one interface, the same Trainer:

- RemoteSource (topology.mode=loader): a dedicated loader rank encodes and sends (sd3/distributed BatchReceiver).
- ColocatedSource (mode=colocated): RowLoader + Conditioner run in this process, one step ahead in a thread.
- CachedSource (mode=cached): batches read back from the cache `sd3 cache` wrote (sd3/data/cached.py).

Every source walks the same BucketBatchSampler stream: micro-batch k of this rank is sampler step k of its
loader (`loader_index` of `num_loaders`), so checkpoints store one number per loader and a resumed run
continues the same stream. ColocatedSource seeds the Conditioner's generator with the sampler's
seed_for_step, as the loader ranks do, so all three modes see the same VAE sample for the same step.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from sd3.batch import Batch
from sd3.config import LOADER_MODES, Config
from sd3.data.cached import CacheReader
from sd3.data.sampler import BucketBatchSampler
from sd3.distributed import BatchReceiver
from sd3.encoders.producer import BatchProducer, build_sampler
from sd3.train.checkpointer import ResumePlan, data_start


@dataclass
class SourceStats:
    """What a source reports with each batch. `timings` and `skipped` are cumulative since the source started."""

    step: int  # sampler step of this batch
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part of producing batches
    skipped: dict[str, int] = field(default_factory=dict)  # rows dropped, per reason
    stop_requested: bool = False  # the producer was asked to stop (a signal on a loader rank)
    peak_memory_bytes: int = 0  # the encoders' peak memory while making this batch (0: no encoders, e.g. a cache)


class BatchSource(Protocol):
    """num_loaders: loaders in the job; counts_rows: this rank adds its loader's skip counts to the run's totals
    (a loader's first consumer only); sampler: the BucketBatchSampler of this rank's loader, whose state_dict is
    the data position a checkpoint stores."""

    num_loaders: int
    counts_rows: bool
    sampler: BucketBatchSampler

    def next(self) -> tuple[Batch, SourceStats]:
        """The next micro-batch of this rank (blocking)."""

    def stop(self, step: int) -> None:
        """Training consumed sampler steps < step and is done; release the producer."""

    def fail(self, message: str) -> None:
        """This model rank is failing; tell the producer (best effort, never blocks)."""


def empty_batch(cfg: Config, height: int, width: int) -> Batch:
    """A batch of 0 rows with the shapes of a (height, width) bucket: every row of the step was bad."""
    m = cfg.model
    latent = (m.in_channels, height // m.vae_downsample, width // m.vae_downsample)
    return Batch.empty(latent, (2 * m.text_tokens, m.context_dim), m.pooled_dim)


class ColocatedSource:
    """Encoders in the model's process (the loader rank's BatchProducer, run here). Step k+1 is encoded in a
    worker thread while the model trains on step k (torch releases the GIL in its kernels), the in-process
    analogue of the loader ranks' prefetch."""

    def __init__(self, cfg: Config, loader_index: int, num_loaders: int, device: torch.device, start_step: int,
                 sampler: BucketBatchSampler | None = None):
        self.producer = BatchProducer(cfg, cfg.data.batch_size, loader_index, num_loaders, device, sampler)
        self.sampler = self.producer.sampler
        self.num_loaders = num_loaders
        self.counts_rows = True  # every colocated rank is its own loader
        self.step = start_step
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="colocated-encoder")
        self.pending: Future = self.pool.submit(self.producer, self.step)

    def next(self) -> tuple[Batch, SourceStats]:
        batch, timings, skipped = self.pending.result()
        peak = self.producer.peak_memory_bytes  # of this batch's step: read before the next one starts
        step = self.step
        self.step += 1
        self.pending = self.pool.submit(self.producer, self.step)
        return batch, SourceStats(step, timings, skipped, peak_memory_bytes=peak)

    def stop(self, step: int) -> None:
        self.pending.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.producer.close()

    def fail(self, message: str) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class CachedSource:
    """Batches read from a cache folder: the sampler picks the rows, the cache supplies their encodings."""

    def __init__(self, cfg: Config, loader_index: int, num_loaders: int, start_step: int,
                 sampler: BucketBatchSampler | None = None):
        self.cfg = cfg
        if sampler is None:
            self.index, self.sampler = build_sampler(cfg, loader_index, num_loaders, cfg.data.batch_size)
        else:
            self.index, self.sampler = sampler.index, sampler
        self.reader = CacheReader(cfg.topology.cache_folder)
        self.reader.check_compatible(cfg, self.index)
        self.num_loaders = num_loaders
        self.counts_rows = True
        self.step = start_step
        self.read_s = 0.0

    def next(self) -> tuple[Batch, SourceStats]:
        planned = self.sampler.batch(self.step)
        start = time.perf_counter()
        batch = self.reader.read(planned.row_ids)
        if batch is None:
            batch = empty_batch(self.cfg, planned.height, planned.width)
        self.read_s += time.perf_counter() - start
        stats = SourceStats(self.step, {"read": self.read_s}, dict(self.reader.skipped))
        self.step += 1
        return batch, stats

    def stop(self, step: int) -> None:
        self.reader.close()

    def fail(self, message: str) -> None:
        self.reader.close()


class RemoteSource:
    """Batches from this rank's loader over torch.distributed (sd3/distributed). Raises LoaderFailed when it dies."""

    def __init__(self, topology, start_step: int, sampler: BucketBatchSampler):
        self.receiver = BatchReceiver(topology, start_step)
        self.sampler = sampler
        self.num_loaders = topology.num_loaders
        # Every consumer of a loader sees that loader's skip counts; only the first one adds them to the totals.
        self.counts_rows = topology.consumer_index == 0

    def next(self) -> tuple[Batch, SourceStats]:
        batch, stats = self.receiver.next()  # the transport's LoaderStats -> the trainer's one stats type
        return batch, SourceStats(stats.step, dict(stats.timings), dict(stats.skipped), stats.stop_requested,
                                  stats.peak_memory_bytes)

    def stop(self, step: int) -> None:
        self.receiver.stop(step)
        self.receiver.close()

    def fail(self, message: str) -> None:
        self.receiver.fail(message)


def loader_sampler(cfg: Config, topology) -> BucketBatchSampler:
    """The sampler of this rank's loader (a loader rank's own; a model rank's loader's; in colocated / cached
    mode the rank's own stream), knowing every loader's rows per step: data.batch_size x the model ranks each feeds
    (they may differ, e.g. 3 loaders feeding 2+2+1 ranks)."""
    if cfg.topology.mode in LOADER_MODES:
        loader_rows = [cfg.data.batch_size * len(topology.loader_to_model[r]) for r in sorted(topology.loader_to_model)]
    else:
        loader_rows = [cfg.data.batch_size] * topology.num_loaders
    return build_sampler(cfg, topology.loader_index, topology.num_loaders, loader_rows[topology.loader_index],
                         loader_rows)[1]


def build_source(cfg: Config, topology, device: torch.device, plan: ResumePlan | None) -> BatchSource:
    """The source for cfg.topology.mode on a model rank, started at the data position of `plan` (or step 0)."""
    mode = cfg.topology.mode
    sampler = loader_sampler(cfg, topology)
    start_step = data_start(plan, sampler)
    if mode in LOADER_MODES:
        return RemoteSource(topology, start_step, sampler)
    if mode == "colocated":
        # The encoders share this rank's device, unless encoders.device=cpu keeps them off the GPU (to save memory).
        encoder_device = torch.device("cpu") if cfg.encoders.device == "cpu" else device
        return ColocatedSource(cfg, topology.loader_index, topology.num_loaders, encoder_device, start_step, sampler)
    if mode == "cached":
        return CachedSource(cfg, topology.loader_index, topology.num_loaders, start_step, sampler)
    raise ValueError(f"topology.mode '{mode}' is not one of loader, colocated, cached")
