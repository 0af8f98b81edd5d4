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
import traceback
from collections.abc import Callable

import torch

from sd3.batch import Batch
from sd3.config import Config
from sd3.data.sampler import BucketBatchSampler
from sd3.distributed import signals
from sd3.distributed.errors import ConsumerFailed
from sd3.distributed.sender import BatchSender
from sd3.distributed.topology import Topology
from sd3.distributed.wire import ERROR, FLAG_STOP_REQUESTED, STOP
from sd3.encoders.producer import BatchProducer

log = logging.getLogger(__name__)

# produce(step) -> (global batch of that step, cumulative timings in seconds, cumulative skipped rows by reason)
Produce = Callable[[int], tuple[Batch, dict[str, float], dict[str, int]]]


def serve(topology: Topology, sender: BatchSender, produce: Produce, start_step: int,
          peak_memory: Callable[[], int] = lambda: 0) -> int:
    """Produce and send steps start_step, start_step+1, ... until every consumer has stopped. Returns the exit code.
    peak_memory(): the encoders' peak memory in the step just produced, reported in each header."""
    step = start_step
    consumers = topology.consumers
    try:
        while sender.active:
            sender.poll()
            if topology.heartbeat is not None:
                topology.heartbeat.progress(step)
            batch, timings, skipped = produce(step)  # (B_global, ...)
            flags = FLAG_STOP_REQUESTED if signals.requested() else 0
            peak = peak_memory()
            # Consecutive slices, in consumer order.
            for consumer, part in zip(consumers, batch.split(len(consumers)), strict=True):
                sender.send(consumer, step, part, timings, skipped, flags, peak)
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


def run_loader(cfg: Config, topology: Topology, start_step: int, sampler: BucketBatchSampler | None = None) -> int:
    """The whole life of a loader rank; `start_step` is the first sampler step its consumers expect; `sampler` the
    loader's sampler placed at a resumed run's data position (None: a fresh one). Exit code."""
    if not topology.is_loader:
        raise ValueError(f"rank {topology.rank} is a {topology.role} rank, not a loader")
    # A stop signal does not stop a loader: it is forwarded in the headers (FLAG_STOP_REQUESTED), the model ranks
    # agree on a step and checkpoint, then ask this loader to stop.
    with signals.handled():
        sender = BatchSender(topology)
        try:
            device = topology.device if cfg.encoders.device == "auto" else torch.device(cfg.encoders.device)
            global_batch = cfg.data.batch_size * len(topology.consumers)
            producer = BatchProducer(cfg, global_batch, topology.loader_index, topology.num_loaders, device, sampler)
        except Exception as e:
            text = f"{type(e).__name__}: {e}"
            log.error("loader rank %d failed to start: %s\n%s", topology.rank, text, traceback.format_exc())
            sender.send_error(text, start_step, kind=ERROR)
            return 1
        try:
            return serve(topology, sender, producer, start_step, lambda: producer.peak_memory_bytes)
        finally:
            producer.close()
