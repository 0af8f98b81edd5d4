"""The loader-rank loop: sampler step -> rows -> decoded images + captions -> encoders -> split -> send.

A loader rank never builds the MMDiT or an optimizer. Per sampler step k it reads and decodes the rows of step k
(in a worker thread, one step ahead), runs the text encoders and the VAE on the whole global batch
(data.batch_size x its consumers), splits it into one consecutive slice per consumer and sends each its slice
with k as the sequence number. The sends are asynchronous, so step k+1 is decoded and encoded while step k is
in flight; at most topology.max_in_flight steps are in flight per consumer.

It stops when every consumer asked it to (end of training or an agreed pre-emption step), and fails loudly
otherwise: its own exception goes to every consumer as an ERROR header with the exception text; a consumer that
fails or vanishes makes it send STOP to the others. Either way it returns non-zero with a message naming the rank.
"""

from __future__ import annotations

import logging
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from sd3.batch import Batch
from sd3.config import Config
from sd3.dist.topology import Topology
from sd3.dist.transport import ERROR, FLAG_STOP_REQUESTED, STOP, BatchSender, ConsumerFailed
from sd3.train import signals

log = logging.getLogger(__name__)

# produce(step) -> (global batch of that step, cumulative timings in seconds, cumulative skipped rows by reason)
Produce = Callable[[int], tuple[Batch, dict[str, float], dict[str, int]]]


class BatchProducer:
    """The global batch of each sampler step of one loader, encoded on `device`.

    Rows are read and decoded in a worker thread one step ahead of the encoders. The VAE posterior sample of
    step k is drawn with a generator seeded by the sampler's seed_for_step(k), as in colocated mode, so the
    same (seed, loader_index, num_loaders, step) gives the same batch in every mode.
    """

    def __init__(self, cfg: Config, global_batch: int, loader_index: int, num_loaders: int, device: torch.device):
        from sd3.data.batches import RowLoader, empty_counts
        from sd3.data.index import BucketIndex
        from sd3.data.sampler import BucketBatchSampler
        from sd3.encoders.conditioner import Conditioner

        self.cfg = cfg
        index = BucketIndex.load(cfg.data.bucket_indices_path, cfg.data.parquet_folder)
        self.sampler = BucketBatchSampler(index, global_batch, cfg.data.seed, loader_index, num_loaders,
                                          cfg.data.min_bucket_size)
        self.rows = RowLoader(cfg.data.parquet_folder, cfg.data, row_counts=index.manifest["rows"])
        self.conditioner = Conditioner(cfg, device)
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
        if len(raw) == 0:  # every row of the step was bad: an empty batch of the bucket's shapes
            batch = self._empty(planned.height, planned.width)
        else:
            generator = torch.Generator(device=self.conditioner.device).manual_seed(planned.seed_for_step)
            batch = self.conditioner(raw, generator)
        return batch, {"decode": self.decode_s, **self.conditioner.timings}, dict(self.skipped)

    def _empty(self, height: int, width: int) -> Batch:
        m, dtype, device = self.cfg.model, self.conditioner.batch_dtype, self.conditioner.device
        h, w = height // m.vae_downsample, width // m.vae_downsample
        return Batch(
            torch.zeros(0, m.in_channels, h, w, dtype=dtype, device=device),  # (0, C, h, w)
            torch.zeros(0, 2 * m.text_tokens, m.context_dim, dtype=dtype, device=device),  # (0, 2T, D)
            torch.zeros(0, m.pooled_dim, dtype=dtype, device=device),  # (0, P)
            torch.zeros(0, dtype=torch.int64, device=device),  # (0,)
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.rows.close()


def serve(topology: Topology, sender: BatchSender, produce: Produce, start_step: int) -> int:
    """Produce and send steps start_step, start_step+1, ... until every consumer has stopped. Returns the exit code."""
    step = start_step
    consumers = topology.consumers
    try:
        while sender.active:
            sender.poll()
            batch, timings, skipped = produce(step)  # (B_global, ...)
            flags = FLAG_STOP_REQUESTED if signals.requested() else 0
            for consumer, part in zip(consumers, batch.split(len(consumers))):  # consecutive slices, consumer order
                sender.send(consumer, step, part, timings, skipped, flags)
            step += 1
        sender.close()
    except ConsumerFailed as e:
        log.error("loader rank %d stops at step %d: %s", topology.rank, step, e)
        sender.send_error(f"stopped because {e}", step, kind=STOP)
        return 1
    except Exception as e:  # anything else is this loader's own failure: tell the consumers, then exit
        text = f"{type(e).__name__}: {e}"
        log.error("loader rank %d failed at step %d: %s\n%s", topology.rank, step, text, traceback.format_exc())
        sender.send_error(text, step, kind=ERROR)
        return 1
    log.info("loader rank %d: all consumers stopped (%s); sent steps %d..%d",
             topology.rank, sender.stopped, start_step, step - 1)
    return 0


def run_loader(cfg: Config, topology: Topology, start_step: int) -> int:
    """The whole life of a loader rank; `start_step` is the first sampler step its consumers expect. Exit code."""
    if not topology.is_loader:
        raise ValueError(f"rank {topology.rank} is a {topology.role} rank, not a loader")
    # A stop signal does not stop a loader: it is forwarded in the headers (FLAG_STOP_REQUESTED), the model ranks
    # agree on a step and checkpoint, then ask this loader to stop.
    previous = signals.install()
    sender = BatchSender(topology)
    try:
        device = topology.device if cfg.encoders.device == "auto" else torch.device(cfg.encoders.device)
        global_batch = cfg.data.batch_size * len(topology.consumers)
        producer = BatchProducer(cfg, global_batch, topology.loader_index, topology.num_loaders, device)
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        log.error("loader rank %d failed to start: %s\n%s", topology.rank, text, traceback.format_exc())
        sender.send_error(text, start_step, kind=ERROR)
        signals.restore(previous)
        return 1
    try:
        return serve(topology, sender, producer, start_step)
    finally:
        producer.close()
        signals.restore(previous)
