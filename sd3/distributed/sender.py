"""Loader side of the transport: asynchronous sends to each consumer, a bounded number in flight per consumer.

A send not yet completed is a batch not yet taken by its consumer (sd3/distributed/p2p.py), so bounding
incomplete sends by `topology.max_in_flight` bounds how far the loader runs ahead. Every sent tensor is kept
referenced until its Work completes: the backend reads it asynchronously, so it must be neither freed nor reused.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sd3.batch import Batch
from sd3.distributed.control import CTRL_STOP, ControlChannel
from sd3.distributed.errors import ConsumerFailed, TransportTimeout, first_line
from sd3.distributed.heartbeat import name_hung_first
from sd3.distributed.p2p import wait_work
from sd3.distributed.stats import LOADER_STATS
from sd3.distributed.topology import Topology
from sd3.distributed.wire import DATA, DATA_TAG, DONE, ERROR, KIND_NAMES, StatsLayout, encode_header, encode_message

log = logging.getLogger(__name__)


@dataclass
class _Outgoing:
    step: int
    works: list[dist.Work]
    tensors: list[torch.Tensor]  # kept alive until the sends complete


class BatchSender:
    """Sends of loader rank `topology.rank` to its consumers, at most topology.max_in_flight batches in flight each.

    `poll()` reads the back-channel: a consumer that asks to stop gets a DONE header and no more batches
    (`stopped`); one that says it failed raises ConsumerFailed, as does one whose connection breaks or that takes
    nothing for longer than the timeout. channel / layout: as the receivers' (sd3/distributed/receiver.py).
    """

    def __init__(self, topology: Topology, channel: str = "train", layout: StatsLayout = LOADER_STATS):
        if topology.store is None:
            raise ValueError(f"rank {topology.rank} has no store: the transport needs init_distributed's")
        self.topo = topology
        self.layout = layout
        self.consumers = list(topology.consumers)
        self.control = ControlChannel(topology.store, topology.rank, channel)
        self.in_flight: dict[int, deque[_Outgoing]] = {c: deque() for c in self.consumers}
        self.stopped: dict[int, int] = {}  # consumer -> step it stopped at
        self.finished: set[int] = set()  # consumers sent DONE / ERROR / STOP, or gone: nothing more goes to them
        self.send_seconds = 0.0  # cumulative time spent issuing sends
        self.wait_seconds = 0.0  # cumulative time blocked on the in-flight bound (the model ranks are slower)

    def poll(self) -> None:
        """Handle back-channel messages; raises ConsumerFailed for a consumer that reports a failure."""
        for c, kind, step, message in self.control.poll(self.consumers, self.finished):
            if kind != CTRL_STOP:
                self.finished.add(c)
                raise ConsumerFailed(f"model rank {c} failed at step {step}" + (f": {message}" if message else ""))
            log.info("loader rank %s: model rank %s stops at step %s", self.topo.rank, c, step)
            self.stopped[c] = step
            self._send(c, encode_header(self.layout, DONE, step, None), step)
            self.finished.add(c)

    @property
    def active(self) -> list[int]:
        """Consumers that still want batches."""
        return [c for c in self.consumers if c not in self.finished]

    def _wait_oldest(self, consumer: int, timeout_s: float) -> None:
        out = self.in_flight[consumer][0]
        try:
            for w in out.works:
                wait_work(w, timeout_s)
        except TransportTimeout:
            self.finished.add(consumer)
            message = (f"model rank {consumer} has not taken step {out.step} within {timeout_s / 60:g} min "
                       f"(topology.timeout_minutes): is it hung?")
            raise ConsumerFailed(name_hung_first(self.topo.store, list(range(self.topo.world_size)), message,
                                                 me=self.topo.rank)) from None
        except RuntimeError as e:
            self.finished.add(consumer)
            raise ConsumerFailed(f"lost model rank {consumer} sending step {out.step}: {first_line(e)}") from None
        self.in_flight[consumer].popleft()

    def _send(self, consumer: int, header: torch.Tensor, step: int, payload: list[torch.Tensor] = ()) -> None:
        start = time.perf_counter()
        device = self.topo.transport_device
        tensors = [header.to(device)] + [t.to(device).contiguous() for t in payload if t.numel()]
        try:
            works = [dist.isend(t, dst=consumer, tag=DATA_TAG) for t in tensors]
        except RuntimeError as e:  # gloo raises here when the peer's connection is already closed
            self.finished.add(consumer)
            raise ConsumerFailed(f"lost model rank {consumer} sending step {step}: {first_line(e)}") from None
        self.in_flight[consumer].append(_Outgoing(step, works, tensors))
        self.send_seconds += time.perf_counter() - start

    def send(self, consumer: int, step: int, batch: Batch, timings: dict[str, float] | None = None,
             skipped: dict[str, int] | None = None, flags: int = 0, peak_memory_bytes: int = 0) -> None:
        """Send `batch` as sampler step `step` to `consumer`, once fewer than max_in_flight are in flight to it.

        timings / skipped: the loader's cumulative statistics to report (the layout's names: seconds, rows);
        the "send" and "wait" parts are filled in here. peak_memory_bytes: the encoders' peak while making this step.
        """
        if consumer in self.finished:
            return
        start = time.perf_counter()
        while len(self.in_flight[consumer]) >= self.topo.max_in_flight:
            self._wait_oldest(consumer, self.topo.timeout_s)
        self.wait_seconds += time.perf_counter() - start
        timings = dict(timings or {}, send=self.send_seconds, wait=self.wait_seconds)
        # The tensors go as they are, one message each: packing them into one message was measured slower
        # (`sd3 bench pipeline`: the copy costs more than the three messages it saves).
        header = encode_header(self.layout, DATA, step, batch, timings, skipped, flags, peak_memory_bytes)
        self._send(consumer, header, step, batch.tensors())

    def send_error(self, text: str, step: int, kind: int = ERROR, timeout_s: float | None = None) -> None:
        """Tell every consumer still listening that this loader failed (ERROR) or stops because of another rank
        (STOP), and wait up to `timeout_s` (default: 30 s, at most the transport timeout) for them to take it.
        Never raises: the loader is going down anyway."""
        timeout_s = min(30.0, self.topo.timeout_s) if timeout_s is None else timeout_s
        msg = encode_message(text)
        targets = self.active
        for c in targets:
            try:
                self._send(c, encode_header(self.layout, kind, step, None), step, [msg])
            except ConsumerFailed as e:
                log.warning("could not send %s: %s", KIND_NAMES[kind], e)
            self.finished.add(c)
        self.flush(timeout_s, consumers=targets, raise_errors=False)

    def flush(self, timeout_s: float, consumers: list[int] | None = None, raise_errors: bool = True) -> None:
        """Wait until everything sent to `consumers` (default all) has been taken, within `timeout_s` in total.

        With raise_errors False (the loader is going down) a consumer that cannot be reached is logged and skipped."""
        deadline = time.perf_counter() + timeout_s
        for c in consumers if consumers is not None else self.consumers:
            try:
                while self.in_flight[c]:
                    self._wait_oldest(c, max(deadline - time.perf_counter(), 0.001))
            except ConsumerFailed as e:
                if raise_errors:
                    raise
                log.warning("%s", e)

    def close(self, timeout_s: float | None = None) -> None:
        """Wait for the consumers to take what is in flight (bounded by the timeout)."""
        self.flush(self.topo.timeout_s if timeout_s is None else timeout_s)
