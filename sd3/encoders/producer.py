"""The loader's work for one sampler step: the step's rows -> decoded images + captions -> encoders -> Batch.

One piece of code wherever batches are encoded — a loader rank (sd3/distributed/loader.py), a colocated model rank
(sd3/train/sources.py) and `sd3 cache` — so that the same (seed, loader_index, num_loaders, step) gives the
same batch in every mode: the VAE posterior sample of step k is drawn with a generator seeded by the sampler's
seed_for_step(k), and the captions of step k are chosen from the same seed by the RowLoader.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from sd3.batch import Batch
from sd3.config import Config
from sd3.data.sampler import BucketBatchSampler
from sd3.errors import ConfigError


def build_sampler(cfg: Config, loader_index: int, num_loaders: int, global_batch: int,
                  loader_rows: Sequence[int] | None = None):
    """(index, sampler) of one loader over cfg.data's shards; loading the index checks it still matches the folder.
    loader_rows: rows per step of every loader when they differ (loaders feeding unequal numbers of model ranks)."""
    from sd3.data.index import BucketIndex
    from sd3.data.sampler import BucketBatchSampler

    index = BucketIndex.load(cfg.data.bucket_indices_path, cfg.data.parquet_folder)
    sampler = BucketBatchSampler(
        index, global_batch, cfg.data.seed, loader_index, num_loaders, cfg.data.min_bucket_size, loader_rows
    )
    return index, sampler


class BatchProducer:
    """The encoded global batch of each sampler step of one loader, on `device`.

    cfg: the run's Config; global_batch: rows per step (data.batch_size x the consumers fed from it);
    loader_index / num_loaders: which share of every bucket this stream walks; device: where the encoders run
    (a torch.device, or "auto"/"cpu"/"cuda").

    `producer(step) -> (batch, timings, skipped)`: timings are cumulative seconds per part (decode and the
    Conditioner's parts), skipped the cumulative rows dropped per reason. Rows are read and decoded in a worker
    thread one step ahead of the encoders, so decoding step k+1 overlaps encoding step k.
    """

    def __init__(self, cfg: Config, global_batch: int, loader_index: int, num_loaders: int,
                 device: torch.device | str, sampler: BucketBatchSampler | None = None):
        from sd3.data.batches import RowLoader, empty_counts
        from sd3.data.latents import LatentCacheReader
        from sd3.data.shards import ShardReader
        from sd3.encoders.conditioner import Conditioner

        if sampler is None:
            self.index, self.sampler = build_sampler(cfg, loader_index, num_loaders, global_batch)
        else:  # a sampler already placed at its data position (a resumed run's; see sd3/train/checkpointer.py)
            self.index, self.sampler = sampler.index, sampler
        if cfg.topology.mode == "hybrid" and not cfg.data.latent_cache:
            raise ConfigError("topology.mode=hybrid needs data.latent_cache (a folder `sd3 cache --only vae` wrote)")
        self.conditioner = Conditioner(cfg, device)
        latents = None
        if cfg.data.latent_cache:
            shards = ShardReader(cfg.data.parquet_folder, row_counts=self.index.manifest["rows"])
            latents = LatentCacheReader(cfg.data.latent_cache, shards)
            latents.check_vae(self.conditioner.vae)
        self.rows = RowLoader(cfg.data.parquet_folder, cfg.data, row_counts=self.index.manifest["rows"],
                              latents=latents, pin_memory=self.conditioner.device.type == "cuda")
        self.decode_s = 0.0
        self.skipped = empty_counts()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loader-decode")
        self._pending: dict[int, Future] = {}

    def _decode(self, step: int):
        start = time.perf_counter()
        planned = self.sampler.batch(step)
        raw = self.rows.load(planned)
        # Snapshot here, in the worker: the counters of step k are final before step k+1 is decoded.
        return planned, raw, time.perf_counter() - start, dict(self.rows.counters)

    def _submit(self, step: int) -> None:
        if step not in self._pending:
            self._pending[step] = self._pool.submit(self._decode, step)

    def __call__(self, step: int) -> tuple[Batch, dict[str, float], dict[str, int]]:
        self._submit(step)
        planned, raw, seconds, skipped = self._pending.pop(step).result()
        self._submit(step + 1)
        self.decode_s += seconds
        self.skipped = skipped
        generator = torch.Generator(device=self.conditioner.device).manual_seed(planned.seed_for_step)
        batch = self.conditioner(raw, generator)  # a step whose rows were all bad gives an empty batch of its bucket
        return batch, {"decode": self.decode_s, **self.conditioner.timings}, dict(self.skipped)

    @property
    def peak_memory_bytes(self) -> int:
        """The encoders' peak memory during the last step: see Conditioner.peak_memory_bytes / memory_source."""
        return self.conditioner.peak_memory_bytes

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.rows.close()
