"""Batches from a loader rank to its model ranks over torch.distributed point-to-point (ARCHITECTURE §6).

Wire format, per message, in order on the (loader, consumer) pair:
1. a fixed-size int64 *header* (HEADER_LEN): magic, version, kind, sequence number (the sampler step), the
   batch's row count, flags (FLAG_STOP_REQUESTED: a stop signal reached the loader), for each Batch tensor
   its dtype code, ndim and shape (up to MAX_NDIM dims), then the loader's statistics: cumulative
   microseconds per TIMING_FIELDS part and cumulative skipped rows per SKIP_REASONS (sd3/data/batches.py);
2. kind DATA: the Batch tensors, each of exactly the announced shape and dtype — nothing is padded to the
   largest bucket (the source padded with `inf` so the receiver could guess shapes). Empty tensors are not sent.
   kind ERROR / STOP: one MESSAGE_BYTES uint8 tensor holding the loader's error text (UTF-8, zero-filled).
   kind DONE: nothing; the loader acknowledges a consumer's stop request and sends no more.

The back-channel runs the other way through the job's c10d store (ControlChannel): CTRL_STOP "I consumed every
batch before `step`, stop" or CTRL_FAILED "this model rank is failing". The loader polls it once per step. A
consumer that dies is noticed by the loader's next send to it (connection closed).

gloo completes an isend only once the receiver has posted the matching receive, so "sends not yet completed" is
exactly "batches in flight", which `BatchSender` bounds by `topology.max_in_flight` per consumer. On the model
side a receiving thread takes each batch as soon as it is sent (one batch ahead of the trainer, plus a one-slot
queue), so batch k+1 travels while the trainer computes on batch k.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sd3.batch import Batch
from sd3.data.batches import SKIP_REASONS
from sd3.distributed.topology import Topology, exit_now

log = logging.getLogger(__name__)

MAGIC = 0x5344_3342_4154_4348  # "SD3BATCH"
VERSION = 1
DATA, STOP, ERROR, DONE = 1, 2, 3, 4
KIND_NAMES = {DATA: "DATA", STOP: "STOP", ERROR: "ERROR", DONE: "DONE"}
CTRL_STOP, CTRL_FAILED = 1, 2  # back-channel message kinds
FLAG_STOP_REQUESTED = 1  # SIGTERM/SIGUSR1 reached the loader: the model ranks should agree on a stop step

NUM_TENSORS = 4  # Batch fields: latents, context, pooled, row_ids
MAX_NDIM = 4
TIMING_FIELDS = ("decode", "gemma", "bert", "clip", "vae", "send", "wait")  # loader seconds, cumulative
MESSAGE_BYTES = 2048
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool)

# Header layout (int64 slots).
_FIXED = 6  # magic, version, kind, step, rows, flags
_TENSOR_SLOTS = 2 + MAX_NDIM  # dtype code, ndim, dims
_TIMINGS_AT = _FIXED + NUM_TENSORS * _TENSOR_SLOTS
_SKIPS_AT = _TIMINGS_AT + len(TIMING_FIELDS)
HEADER_LEN = _SKIPS_AT + len(SKIP_REASONS)

# gloo matches messages by (peer, tag); NCCL ignores tags and keeps order per pair. Both keep the send order.
DATA_TAG = 17
POLL_S = 0.002  # sleep between polls of pending NCCL work


class LoaderFailed(RuntimeError):
    """A model rank cannot get its next batch: the loader failed, stopped, died or went silent. Names the loader rank."""


class ConsumerFailed(RuntimeError):
    """A loader cannot reach one of its model ranks (it said so, died, or went silent). Names the model rank."""


@dataclass
class LoaderStats:
    """What the loader reports with each batch (cumulative since it started) plus this rank's wait for it."""

    loader_rank: int
    step: int
    rows: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per TIMING_FIELDS part, cumulative
    skipped: dict[str, int] = field(default_factory=dict)  # rows per SKIP_REASONS, cumulative
    wait_s: float = 0.0  # seconds this model rank waited in next() for this batch (stall numerator)
    nbytes: int = 0  # payload bytes received
    stop_requested: bool = False  # a stop signal reached the loader (FLAG_STOP_REQUESTED)


def encode_header(kind: int, step: int, batch: Batch | None, timings: dict[str, float] | None = None,
                  skipped: dict[str, int] | None = None, flags: int = 0) -> torch.Tensor:
    """The HEADER_LEN int64 header announcing `batch` (or nothing, for STOP/ERROR/DONE)."""
    # Built as a Python list and turned into a tensor once: per-slot tensor writes cost ~20x more.
    h = [MAGIC, VERSION, kind, step, len(batch) if batch is not None else 0, flags]
    tensors = batch.tensors() if batch is not None else [torch.empty(0)] * NUM_TENSORS
    for i, t in enumerate(tensors):
        if t.dim() > MAX_NDIM:
            raise ValueError(f"Batch tensor {i} has {t.dim()} dims; the header holds at most {MAX_NDIM}")
        if t.dtype not in DTYPES:
            raise ValueError(f"Batch tensor {i} has dtype {t.dtype}, which the transport does not carry")
        dims = list(t.shape) if batch is not None else []
        h += [DTYPES.index(t.dtype) if batch is not None else 0, len(dims)] + dims + [0] * (MAX_NDIM - len(dims))
    timings, skipped = timings or {}, skipped or {}
    h += [round(timings.get(k, 0.0) * 1e6) for k in TIMING_FIELDS]
    h += [int(skipped.get(k, 0)) for k in SKIP_REASONS]
    return torch.tensor(h, dtype=torch.int64)


@dataclass
class Header:
    kind: int
    step: int
    rows: int
    flags: int
    specs: list[tuple[torch.dtype, tuple[int, ...]]]  # per Batch tensor
    timings: dict[str, float]
    skipped: dict[str, int]


def decode_header(h: torch.Tensor, peer: int) -> Header:
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
    timings = {k: us / 1e6 for k, us in zip(TIMING_FIELDS, v[_TIMINGS_AT:_SKIPS_AT])}
    skipped = dict(zip(SKIP_REASONS, v[_SKIPS_AT:HEADER_LEN]))
    return Header(kind=v[2], step=v[3], rows=v[4], flags=v[5], specs=specs, timings=timings, skipped=skipped)


def encode_message(text: str) -> torch.Tensor:
    data = text.encode("utf-8", errors="replace")[:MESSAGE_BYTES]
    msg = torch.zeros(MESSAGE_BYTES, dtype=torch.uint8)
    msg[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return msg


def decode_message(msg: torch.Tensor) -> str:
    return bytes(msg.cpu().tolist()).rstrip(b"\0").decode("utf-8", errors="replace")


class TransportTimeout(RuntimeError):
    """A point-to-point operation did not complete within the timeout."""


def wait_work(work: dist.Work, backend: str, timeout_s: float) -> None:
    """Block until `work` completes, at most `timeout_s`: TransportTimeout, or RuntimeError if the peer is gone.

    gloo reports completion only through wait() (is_completed() stays False until then) and a timed-out wait
    closes the connection, so gloo waits once with the whole budget. NCCL's wait() only orders CUDA streams, so
    its completion is polled on the host, where the deadline can be kept.
    """
    if backend == "nccl":
        deadline = time.perf_counter() + timeout_s
        while not work.is_completed():
            if time.perf_counter() > deadline:
                raise TransportTimeout(f"timed out after {timeout_s:g} s")
            time.sleep(POLL_S / 4)
        work.wait()
        return
    try:
        work.wait(datetime.timedelta(seconds=max(timeout_s, 0.001)))
    except RuntimeError as e:
        if "imed out" in str(e):
            raise TransportTimeout(f"timed out after {timeout_s:g} s") from None
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ControlChannel:
    """Model -> loader messages ("stop at step S", "failed") through the job's c10d store.

    A point-to-point receive cannot wait on the loader side: gloo only reports completion through a blocking
    wait whose timeout would break the connection, and with NCCL a pending receive would block the data sends
    on the same stream. The store (the TCPStore torchrun or init_process_group created) is polled instead: each
    consumer writes its key, then bumps the loader's counter, so one `add(counter, 0)` per poll sees news.
    """

    def __init__(self, loader: int, channel: str = "train", store: dist.Store | None = None):
        # `channel` separates successive sender/receiver pairs of one job (a benchmark runs several).
        base = store if store is not None else dist.distributed_c10d._get_default_store()
        self.store = dist.PrefixStore(f"sd3/control/{channel}/loader{loader}/", base)
        self.seen = 0

    def tell(self, consumer: int, kind: int, step: int, message: str = "") -> None:
        self.store.set(f"consumer{consumer}", f"{kind}:{step}:{message}")
        self.store.add("count", 1)

    def poll(self, consumers: list[int], done: set[int]) -> list[tuple[int, int, int, str]]:
        """New messages as (consumer, kind, step, message), for consumers not in `done`."""
        count = self.store.add("count", 0)
        if count == self.seen:
            return []
        self.seen = count
        news = []
        for c in consumers:
            key = f"consumer{c}"
            if c not in done and self.store.check([key]):
                kind, step, message = self.store.get(key).decode("utf-8", errors="replace").split(":", 2)
                news.append((c, int(kind), int(step), message))
        return news


def _storage_users(t: torch.Tensor) -> int:
    """How many tensors share `t`'s storage (views included); 0 when torch does not tell."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count(t.untyped_storage()._cdata) if use_count is not None else 0


class ReceiveBuffers:
    """Where received batches land on the CPU: tensors laid out in a few reused flat buffers.

    A fresh 100 MB tensor costs ~10x a reused one on the CPU (every page is faulted in on first touch), which
    would double the transport time of a reference-size batch. A buffer is reused only once nothing else holds
    any tensor of it (the trainer dropped the batch), checked through the storage's use count; otherwise a new
    one is made and the old one left to its holder. On CUDA the caching allocator already reuses memory.
    """

    ALIGN = 64  # bytes; each tensor starts aligned inside its buffer (the wire carries no padding)
    KEEP = 3  # the batch in the trainer's hands, the one in the queue, the one being received

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: list[torch.Tensor] = []
        probe = torch.empty(1, dtype=torch.uint8)
        self.idle_users = _storage_users(probe)  # the count of a buffer nobody else holds

    def _free_buffer(self, nbytes: int) -> torch.Tensor:
        for i, buf in enumerate(self.buffers):
            if self.idle_users and _storage_users(buf) == self.idle_users:
                if buf.numel() >= nbytes:
                    return buf
                self.buffers[i] = torch.empty(nbytes, dtype=torch.uint8)
                return self.buffers[i]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self.buffers = (self.buffers + [buf])[-self.KEEP:]
        return buf

    def tensors(self, specs: list[tuple[torch.dtype, tuple[int, ...]]]) -> list[torch.Tensor]:
        """Empty tensors of exactly these dtypes and shapes."""
        if self.device.type != "cpu":
            return [torch.empty(shape, dtype=dtype, device=self.device) for dtype, shape in specs]
        sizes = [math.prod(shape) * dtype.itemsize for dtype, shape in specs]
        offsets, end = [], 0
        for size in sizes:
            offsets.append(end)
            end += -(-size // self.ALIGN) * self.ALIGN
        buf = self._free_buffer(max(end, 1))
        return [buf[o: o + n].view(dtype).view(shape) for o, n, (dtype, shape) in zip(offsets, sizes, specs)]


class _End:
    """What the receiving thread leaves in the queue when the stream ends: the exception to raise, or None (DONE)."""

    def __init__(self, error: LoaderFailed | None):
        self.error = error


class BatchReceiver:
    """Model side: this rank's slice of every batch from its loader, received one batch ahead in a thread.

    A receiving thread posts the receive of the next header as soon as the previous batch is handed over, the
    payload receives as soon as that header has arrived (it announces the shapes), and leaves the finished batch
    in a one-slot queue — so batch k+1 travels while the trainer computes on batch k, and `next()` only waits
    when the loader is behind. start_step: the sampler step of the first batch expected (resume).
    channel: the back-channel's name, the same as the sender's.
    """

    def __init__(self, topology: Topology, start_step: int = 0, channel: str = "train"):
        if topology.my_loader is None:
            raise ValueError(f"rank {topology.rank} has no loader (role {topology.role}, mode {topology.mode})")
        self.topo = topology
        self.loader = topology.my_loader
        self.start_step = start_step
        self.next_step = start_step  # the step next() returns next
        self.closed = False
        self.control = ControlChannel(self.loader, channel)
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._pool = ReceiveBuffers(topology.transport_device)
        self._ended = threading.Event()  # the receiving thread saw the end of the stream (DONE or a failure)
        self._error: LoaderFailed | None = None
        self._thread = threading.Thread(target=self._receive_loop, name=f"sd3-recv-from-{self.loader}", daemon=True)
        self._thread.start()

    # The receiving thread ------------------------------------------------------------------------------------
    def _recv(self, tensors: list[torch.Tensor], what: str, step: int) -> None:
        """Receive `tensors` (in wire order) from the loader: all receives posted at once, then waited."""
        deadline = time.perf_counter() + self.topo.timeout_s
        try:
            works = [dist.irecv(t, src=self.loader, tag=DATA_TAG) for t in tensors]
            for work in works:
                wait_work(work, self.topo.backend, max(deadline - time.perf_counter(), 0.001))
        except TransportTimeout:
            raise LoaderFailed(f"no {what} of step {step} from loader rank {self.loader} within "
                               f"{self.topo.timeout_s / 60:g} min (topology.timeout_minutes): is it hung?") from None
        except RuntimeError as e:
            raise LoaderFailed(f"lost loader rank {self.loader} while receiving the {what} of step {step}: "
                               f"{_first_line(e)}") from None

    def _receive_one(self, step: int) -> tuple[Batch, LoaderStats] | _End:
        device = self.topo.transport_device
        buf = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
        self._recv([buf], "header", step)
        header = decode_header(buf, self.loader)
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
        tensors = self._pool.tensors(header.specs)
        self._recv([t for t in tensors if t.numel()], "payload", step)  # empty tensors are announced, not sent
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the trainer's stream may use them right away
        stats = LoaderStats(loader_rank=self.loader, step=header.step, rows=header.rows, timings=header.timings,
                            skipped=header.skipped, nbytes=sum(t.numel() * t.element_size() for t in tensors),
                            stop_requested=bool(header.flags & FLAG_STOP_REQUESTED))
        return Batch(*tensors), stats

    def _receive_loop(self) -> None:
        if self.topo.transport_device.type == "cuda":
            torch.cuda.set_device(self.topo.transport_device)  # the current device is per thread
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
    def next(self) -> tuple[Batch, LoaderStats]:
        """The next batch (on topology.transport_device) and its loader's stats; raises LoaderFailed."""
        if self.closed:
            raise LoaderFailed(f"the receiver from loader rank {self.loader} is closed")
        start = time.perf_counter()
        # The thread enforces the timeout on every transfer; this bound only guards against a stuck thread.
        item = self._get(start + self.topo.timeout_s + 60.0)
        if isinstance(item, _End):
            self.closed = True
            if item.error is None:
                raise LoaderFailed(f"loader rank {self.loader} ended the stream before step {self.next_step}")
            raise item.error
        batch, stats = item
        stats.wait_s = time.perf_counter() - start
        self.next_step += 1
        return batch, stats

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
        self._thread.join(timeout=5.0)
        if item.error is not None:
            raise item.error
        if unreachable is not None:
            raise LoaderFailed(f"could not ask loader rank {self.loader} to stop: {_first_line(unreachable)}")

    def fail(self, message: str = "") -> None:
        """Best effort, never blocks for long: tell the loader this model rank is failing, so it stops the others.

        If the receiving thread is still blocked in a gloo wait when the interpreter exits, the process group's
        teardown would abort the process (SIGABRT, "terminate called without an active exception"); an exit hook
        registered here ends such a process with code 1 instead, after flushing the logs.
        """
        if self.closed:
            return
        self.closed = True
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


@dataclass
class _Outgoing:
    step: int
    works: list[dist.Work]
    tensors: list[torch.Tensor]  # kept alive until the sends complete


class BatchSender:
    """Loader side: asynchronous sends to each consumer, at most topology.max_in_flight batches in flight each.

    `poll()` reads the back-channel: a consumer that asks to stop gets a DONE header and no more batches
    (`stopped`); one that says it failed raises ConsumerFailed, as does one whose connection breaks or that takes
    nothing for longer than the timeout.
    """

    def __init__(self, topology: Topology, channel: str = "train"):
        self.topo = topology
        self.consumers = list(topology.consumers)
        self.control = ControlChannel(topology.rank, channel)
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
            self._send(c, encode_header(DONE, step, None), step)
            self.finished.add(c)

    @property
    def active(self) -> list[int]:
        """Consumers that still want batches."""
        return [c for c in self.consumers if c not in self.finished]

    def _wait_oldest(self, consumer: int, timeout_s: float) -> None:
        out = self.in_flight[consumer][0]
        try:
            for w in out.works:
                wait_work(w, self.topo.backend, timeout_s)
        except TransportTimeout:
            self.finished.add(consumer)
            raise ConsumerFailed(f"model rank {consumer} has not taken step {out.step} within "
                                 f"{timeout_s / 60:g} min (topology.timeout_minutes): is it hung?") from None
        except RuntimeError as e:
            self.finished.add(consumer)
            raise ConsumerFailed(f"lost model rank {consumer} sending step {out.step}: {_first_line(e)}") from None
        self.in_flight[consumer].popleft()

    def _send(self, consumer: int, header: torch.Tensor, step: int, payload: list[torch.Tensor] = ()) -> None:
        start = time.perf_counter()
        device = self.topo.transport_device
        tensors = [header.to(device)] + [t.to(device).contiguous() for t in payload if t.numel()]
        try:
            works = [dist.isend(t, dst=consumer, tag=DATA_TAG) for t in tensors]
        except RuntimeError as e:  # gloo raises here when the peer's connection is already closed
            self.finished.add(consumer)
            raise ConsumerFailed(f"lost model rank {consumer} sending step {step}: {_first_line(e)}") from None
        self.in_flight[consumer].append(_Outgoing(step, works, tensors))
        self.send_seconds += time.perf_counter() - start

    def send(self, consumer: int, step: int, batch: Batch, timings: dict[str, float] | None = None,
             skipped: dict[str, int] | None = None, flags: int = 0) -> None:
        """Send `batch` as sampler step `step` to `consumer`, first waiting until fewer than max_in_flight are in flight.

        timings / skipped: the loader's cumulative statistics to report (TIMING_FIELDS seconds, SKIP_REASONS rows);
        the "send" and "wait" parts are filled in here.
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
        self._send(consumer, encode_header(DATA, step, batch, timings, skipped, flags), step, batch.tensors())

    def send_error(self, text: str, step: int, kind: int = ERROR, timeout_s: float = 30.0) -> None:
        """Tell every consumer still listening that this loader failed (ERROR) or stops because of another rank
        (STOP), and wait up to `timeout_s` for them to take it. Never raises: the loader is going down anyway."""
        msg = encode_message(text)
        targets = self.active
        for c in targets:
            try:
                self._send(c, encode_header(kind, step, None), step, [msg])
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
