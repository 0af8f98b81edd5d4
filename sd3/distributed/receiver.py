"""Model side of the transport: this rank's slice of every batch from its loader, received one batch ahead.

A receiving thread posts the receive of the next header as soon as the previous batch is handed over, the payload
receives as soon as that header has arrived (it announces the shapes), and leaves the finished batch in a one-slot
queue — so batch k+1 travels while the trainer computes on batch k, and `next()` only waits when the loader is
behind. With NCCL the receives run on a stream of their own (NCCL orders work on the stream it is issued on, so on
the default stream a receive would queue behind the trainer's compute); the trainer's stream waits on an event
recorded after them, and `record_stream` keeps the caching allocator from reusing their memory too early.

Ownership of received tensors: a batch returned by `next()` is valid until the following `next()`, `stop()`,
`fail()` or `close()`, which hands its buffer back for reuse (sd3/distributed/buffers.py). Keep a clone to hold
one longer.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sd3.batch import Batch
from sd3.distributed.buffers import Lease, ReceiveBuffers
from sd3.distributed.control import CTRL_FAILED, CTRL_STOP, ControlChannel
from sd3.distributed.errors import LoaderFailed, TransportTimeout, first_line
from sd3.distributed.heartbeat import name_hung_first
from sd3.distributed.p2p import wait_work
from sd3.distributed.stats import LOADER_STATS, LoaderStats
from sd3.distributed.topology import Topology, exit_now
from sd3.distributed.wire import (
    DATA_TAG,
    DONE,
    ERROR,
    FLAG_STOP_REQUESTED,
    MESSAGE_BYTES,
    STOP,
    StatsLayout,
    decode_header,
    decode_message,
)

log = logging.getLogger(__name__)


class _End:
    """What the receiving thread leaves in the queue when the stream ends: the exception to raise, or None (DONE)."""

    def __init__(self, error: LoaderFailed | None):
        self.error = error


@dataclass
class _Received:
    batch: Batch
    stats: LoaderStats
    lease: Lease
    ready: object | None  # CUDA event recorded on the receive stream after the payload, or None without one


class BatchReceiver:
    """This model rank's batches from `topology.my_loader`, received in a thread; see the module docstring.

    start_step: the sampler step of the first batch expected (resume). channel: the back-channel's name, the same
    as the sender's. layout: the statistics' names in the headers, the same as the sender's.
    """

    def __init__(self, topology: Topology, start_step: int = 0, channel: str = "train",
                 layout: StatsLayout = LOADER_STATS):
        if topology.my_loader is None:
            raise ValueError(f"rank {topology.rank} has no loader (role {topology.role}, mode {topology.mode})")
        if topology.store is None:
            raise ValueError(f"rank {topology.rank} has no store: the transport needs init_distributed's")
        self.topo = topology
        self.loader = topology.my_loader
        self.layout = layout
        self.start_step = start_step
        self.next_step = start_step  # the step next() returns next
        self.closed = False
        self.control = ControlChannel(topology.store, self.loader, channel)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._pool = ReceiveBuffers(topology.transport_device)
        self._held: Lease | None = None  # the batch the trainer holds (released by the next call)
        self._ended = threading.Event()  # the receiving thread saw the end of the stream (DONE or a failure)
        self._error: LoaderFailed | None = None
        # Made here, on the main thread (stream creation is per device, not per thread); None without CUDA.
        self._stream = torch.cuda.Stream(topology.transport_device) if topology.backend == "nccl" else None
        self._thread = threading.Thread(target=self._receive_loop, name=f"sd3-recv-from-{self.loader}", daemon=True)
        self._thread.start()

    # The receiving thread ------------------------------------------------------------------------------------
    def _timed_out(self, what: str, step: int) -> LoaderFailed:
        message = (f"no {what} of step {step} from loader rank {self.loader} within {self.topo.timeout_s / 60:g} min "
                   f"(topology.timeout_minutes): is it hung?")
        return LoaderFailed(name_hung_first(self.topo.store, list(range(self.topo.world_size)), message,
                                            me=self.topo.rank))

    def _recv(self, tensors: list[torch.Tensor], what: str, step: int) -> None:
        """Receive `tensors` (in wire order) from the loader: all receives posted at once, then waited."""
        deadline = time.perf_counter() + self.topo.timeout_s
        try:
            works = [dist.irecv(t, src=self.loader, tag=DATA_TAG) for t in tensors]
            for work in works:
                wait_work(work, max(deadline - time.perf_counter(), 0.001))
        except TransportTimeout:
            raise self._timed_out(what, step) from None
        except RuntimeError as e:
            raise LoaderFailed(f"lost loader rank {self.loader} while receiving the {what} of step {step}: "
                               f"{first_line(e)}") from None

    def _receive_one(self, step: int) -> _Received | _End:
        device = self.topo.transport_device
        buf = torch.empty(self.layout.header_len, dtype=torch.int64, device=device)
        self._recv([buf], "header", step)
        header = decode_header(self.layout, buf, self.loader)
        if header.kind == DONE:
            return _End(None)
        if header.kind in (STOP, ERROR):
            msg = torch.empty(MESSAGE_BYTES, dtype=torch.uint8, device=device)
            self._recv([msg], "message", step)
            verb = "failed" if header.kind == ERROR else "stopped"
            return _End(LoaderFailed(f"loader rank {self.loader} {verb} at step {header.step}: {decode_message(msg)}"))
        if header.step != step:
            return _End(LoaderFailed(f"loader rank {self.loader} sent step {header.step}, expected step {step} "
                                     f"(a lost or reordered batch)"))
        lease = self._pool.acquire(header.specs)
        tensors = lease.tensors
        self._recv([t for t in tensors if t.numel()], "payload", step)  # empty tensors are announced, not sent
        ready = None
        if self._stream is not None:
            ready = torch.cuda.Event()
            ready.record(self._stream)
        stats = LoaderStats(loader_rank=self.loader, step=header.step, rows=header.rows, timings=header.timings,
                            skipped=header.skipped, nbytes=sum(t.numel() * t.element_size() for t in tensors),
                            stop_requested=bool(header.flags & FLAG_STOP_REQUESTED),
                            peak_memory_bytes=header.peak_memory_bytes)
        return _Received(Batch(*tensors), stats, lease, ready)

    def _receive_loop(self) -> None:
        if self._stream is not None:
            torch.cuda.set_device(self.topo.transport_device)  # the current device is per thread
            with torch.cuda.stream(self._stream):
                self._receive_all()
        else:
            self._receive_all()

    def _receive_all(self) -> None:
        step = self.start_step
        while True:
            try:
                item = self._receive_one(step)
            except LoaderFailed as e:
                item = _End(e)
            except Exception as e:  # a bug here must still reach the trainer, not die silently in this thread
                item = _End(LoaderFailed(f"receiving from loader rank {self.loader} failed: {type(e).__name__}: {e}"))
            if isinstance(item, _End):
                self._error = item.error
                self._ended.set()
            self._queue.put(item)
            if isinstance(item, _End):
                return
            step += 1

    # The trainer's side --------------------------------------------------------------------------------------
    def _release_held(self) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None

    def next(self) -> tuple[Batch, LoaderStats]:
        """The next batch (on topology.transport_device) and its loader's stats; raises LoaderFailed.

        Hands the previous batch's buffer back: that batch must not be used after this call.
        """
        if self.closed:
            raise LoaderFailed(f"the receiver from loader rank {self.loader} is closed")
        self._release_held()
        if self.topo.heartbeat is not None:
            self.topo.heartbeat.progress(self.next_step)
        start = time.perf_counter()
        # The thread enforces the timeout on every transfer; this bound only guards against a stuck thread.
        item = self._get(start + self.topo.timeout_s + 60.0)
        if isinstance(item, _End):
            self.closed = True
            if item.error is None:
                raise LoaderFailed(f"loader rank {self.loader} ended the stream before step {self.next_step}")
            raise item.error
        if item.ready is not None:
            # The trainer's stream reads the tensors after the receives, without the host waiting for either.
            compute = torch.cuda.current_stream(self.topo.transport_device)
            compute.wait_event(item.ready)
            for t in item.batch.tensors():
                t.record_stream(compute)
        self._held = item.lease
        item.stats.wait_s = time.perf_counter() - start
        self.next_step += 1
        return item.batch, item.stats

    def _get(self, deadline: float):
        try:
            return self._queue.get(timeout=max(deadline - time.perf_counter(), 0.001))
        except queue.Empty:
            raise LoaderFailed(f"no batch of step {self.next_step} from loader rank {self.loader} in time "
                               f"(receiving thread stuck)") from None

    def stop(self, step: int) -> None:
        """Tell the loader this rank consumed every batch before `step` and wants no more; drain what is in flight.

        Batches already sent are received and dropped until the loader's DONE, so no send is left hanging. Bounded
        by the timeout. Raises LoaderFailed when the loader failed or vanished instead of acknowledging (e.g. killed
        while the model ranks were stopping): the run then ends non-zero, naming it, after its checkpoint.
        """
        if self.closed:
            return
        self.closed = True
        self._release_held()
        unreachable: Exception | None = None
        try:
            self.control.tell(self.topo.rank, CTRL_STOP, step)
        except Exception as e:  # the store may have gone with the rank that hosted it
            unreachable = e
        deadline = time.perf_counter() + self.topo.timeout_s + 60.0
        while True:
            item = self._get(deadline)
            if isinstance(item, _End):
                break
            item.lease.release()
        self._thread.join(timeout=5.0)
        if item.error is not None:
            raise item.error
        if unreachable is not None:
            raise LoaderFailed(f"could not ask loader rank {self.loader} to stop: {first_line(unreachable)}")

    def fail(self, message: str = "") -> None:
        """Best effort, never blocks for long: tell the loader this model rank is failing, so it stops the others.

        If the receiving thread is still blocked in a wait when the interpreter exits, the process group's
        teardown would abort the process (SIGABRT, "terminate called without an active exception"); an exit hook
        registered here ends such a process with code 1 instead, after flushing the logs.
        """
        if self.closed:
            return
        self.closed = True
        self._release_held()
        atexit.register(self._exit_if_blocked)
        try:
            self.control.tell(self.topo.rank, CTRL_FAILED, self.next_step, message.replace("\n", " ")[:500])
        except Exception as e:  # the store may be gone with the rank that hosted it
            log.warning("could not tell loader rank %s that rank %s failed: %s", self.loader, self.topo.rank, e)

    def _exit_if_blocked(self) -> None:
        self._thread.join(timeout=1.0)
        if self._thread.is_alive():
            exit_now(1)

    def failure(self, wait_s: float = 2.0) -> LoaderFailed | None:
        """The loader's failure, if the receiving thread saw one (waiting up to `wait_s` for it to show).

        For a model rank that failed elsewhere (e.g. DDP lost a peer because the loader died and another model rank
        exited first): the root cause to report, naming the loader rank.
        """
        self._ended.wait(timeout=wait_s)
        return self._error

    def close(self) -> None:
        """Forget the receiver (after stop() or fail(); the daemon thread dies with the process)."""
        self.closed = True
        self._release_held()
