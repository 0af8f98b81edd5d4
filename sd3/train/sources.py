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
from sd3.config import Config


@dataclass
class SourceStats:
    """What a source reports with each batch. `timings` and `skipped` are cumulative since the source started."""

    step: int  # sampler step of this batch
    timings: dict[str, float] = field(default_factory=dict)  # seconds per part of producing batches
    skipped: dict[str, int] = field(default_factory=dict)  # rows dropped, per reason
    stop_requested: bool = False  # the producer was asked to stop (a signal on a loader rank)


class BatchSource(Protocol):
    num_loaders: int

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

    def __init__(self, cfg: Config, loader_index: int, num_loaders: int, device: torch.device, start_step: int):
        from sd3.encoders.producer import BatchProducer

        self.producer = BatchProducer(cfg, cfg.data.batch_size, loader_index, num_loaders, device)
        self.num_loaders = num_loaders
        self.step = start_step
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="colocated-encoder")
        self.pending: Future = self.pool.submit(self.producer, self.step)

    def next(self) -> tuple[Batch, SourceStats]:
        batch, timings, skipped = self.pending.result()
        step = self.step
        self.step += 1
        self.pending = self.pool.submit(self.producer, self.step)
        return batch, SourceStats(step, timings, skipped)

    def stop(self, step: int) -> None:
        self.pending.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.producer.close()

    def fail(self, message: str) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


class CachedSource:
    """Batches read from a cache folder: the sampler picks the rows, the cache supplies their encodings."""

    def __init__(self, cfg: Config, loader_index: int, num_loaders: int, start_step: int):
        from sd3.data.cached import CacheReader
        from sd3.encoders.producer import build_sampler

        self.cfg = cfg
        self.index, self.sampler = build_sampler(cfg, loader_index, num_loaders, cfg.data.batch_size)
        self.reader = CacheReader(cfg.topology.cache_folder)
        self.reader.check_compatible(cfg, self.index)
        self.num_loaders = num_loaders
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

    def __init__(self, topology, start_step: int):
        from sd3.distributed import BatchReceiver

        self.receiver = BatchReceiver(topology, start_step)
        self.num_loaders = topology.num_loaders
        # Every consumer of a loader sees that loader's skip counts; only the first one adds them to the totals.
        self.counts_rows = topology.consumer_index == 0

    def next(self) -> tuple[Batch, SourceStats]:
        batch, stats = self.receiver.next()
        return batch, SourceStats(
            step=stats.step,
            timings=dict(stats.timings),
            skipped=dict(stats.skipped),
            stop_requested=bool(getattr(stats, "stop_requested", False)),
        )

    def stop(self, step: int) -> None:
        self.receiver.stop(step)
        self.receiver.close()

    def fail(self, message: str) -> None:
        self.receiver.fail(message)


def build_source(cfg: Config, topology, device: torch.device, start_step: int) -> BatchSource:
    """The source for cfg.topology.mode on a model rank."""
    mode = cfg.topology.mode
    if mode in ("loader", "hybrid"):
        return RemoteSource(topology, start_step)
    if mode == "colocated":
        # The encoders share this rank's device, unless encoders.device=cpu keeps them off the GPU (to save memory).
        encoder_device = torch.device("cpu") if cfg.encoders.device == "cpu" else device
        return ColocatedSource(cfg, topology.loader_index, topology.num_loaders, encoder_device, start_step)
    if mode == "cached":
        return CachedSource(cfg, topology.loader_index, topology.num_loaders, start_step)
    raise ValueError(f"topology.mode '{mode}' is not one of loader, colocated, cached")
