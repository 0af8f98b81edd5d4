"""An in-process stand-in for NCCL point-to-point, to test the transport's CUDA-side behaviour on a CPU.

`FakeNet.install(monkeypatch)` replaces dist.isend / irecv / send / recv. A Work completes only when the peer's
matching operation is posted (NCCL's rendezvous semantics, in order per pair, tags ignored as NCCL does), or never
for a pair marked `hung`. It checks what the real backend would corrupt silently: a sent tensor freed or mutated
before its Work completed, a receive buffer of another size or dtype than the send. It records per pair the
(kind, bytes) of every message sent and received, the thread and the (fake) CUDA stream of every operation.

`FakeCuda.install(monkeypatch)` replaces the torch.cuda stream/event API with recording fakes (no GPU needed).
Ranks run as threads of this process; a rank's thread sets `FakeNet.local.rank` (the receiver's thread is
attributed through BatchReceiver's topology).
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from sd3.distributed.receiver import BatchReceiver
from sd3.distributed.wire import KIND_NAMES, MAGIC


class FakeWork:
    def __init__(self):
        self.done = threading.Event()
        self.error: str | None = None

    def is_completed(self) -> bool:
        return self.done.is_set()

    def wait(self, timeout=None) -> bool:
        seconds = timeout.total_seconds() if timeout is not None and timeout.total_seconds() > 0 else None
        if not self.done.wait(seconds):
            raise RuntimeError("Work timed out in blocking wait (fake NCCL)")
        if self.error:
            raise RuntimeError(self.error)
        return True


def describe(t: torch.Tensor) -> tuple[str, int]:
    """(kind, bytes) of one message: the header's kind, or "payload"/"message"."""
    nbytes = t.numel() * t.element_size()
    if t.dtype == torch.int64 and t.dim() == 1 and t.numel() > 3 and int(t[0]) == MAGIC:
        return KIND_NAMES.get(int(t[2]), "?"), nbytes
    return ("message" if t.dtype == torch.uint8 and t.dim() == 1 else "payload"), nbytes


@dataclass
class _Send:
    ref: weakref.ref
    snapshot: torch.Tensor
    work: FakeWork


@dataclass
class FakeNet:
    hung: set[tuple[int, int]] = field(default_factory=set)  # (src, dst) pairs whose operations never complete
    sent: dict = field(default_factory=lambda: defaultdict(list))  # (src, dst) -> [(kind, bytes)] at post time
    received: dict = field(default_factory=lambda: defaultdict(list))  # (src, dst) -> [(kind, bytes)] on arrival
    ops: list = field(default_factory=list)  # (op, src, dst, thread name, stream name)
    errors: list = field(default_factory=list)  # what the real backend would have corrupted
    local: threading.local = field(default_factory=threading.local)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._sends: dict = defaultdict(deque)
        self._recvs: dict = defaultdict(deque)

    def rank(self) -> int:
        return self.local.rank

    def _record(self, op: str, src: int, dst: int) -> None:
        stream = getattr(FakeCuda.local, "stream", None)
        self.ops.append((op, src, dst, threading.current_thread().name, stream.name if stream else "default"))

    def _match(self, pair) -> None:
        while self._sends[pair] and self._recvs[pair]:
            send, (buf, rwork) = self._sends[pair].popleft(), self._recvs[pair].popleft()
            tensor = send.ref()
            if tensor is None:
                self.errors.append(f"{pair}: a sent tensor was freed before its Work completed")
                tensor = send.snapshot
            elif not torch.equal(tensor, send.snapshot):
                self.errors.append(f"{pair}: a sent tensor was mutated before its Work completed")
            if (tensor.dtype, tensor.numel()) != (buf.dtype, buf.numel()):
                self.errors.append(f"{pair}: sent {tensor.dtype} x {tensor.numel()}, "
                                   f"receive buffer {buf.dtype} x {buf.numel()}")
            else:
                buf.copy_(tensor.view(buf.shape))
            self.received[pair].append(describe(buf))
            send.work.done.set()
            rwork.done.set()

    def isend(self, tensor, dst, group=None, tag=0):
        src = self.rank()
        with self._lock:
            self._record("send", src, dst)
            self.sent[(src, dst)].append(describe(tensor))
            work = FakeWork()
            if (src, dst) not in self.hung:
                self._sends[(src, dst)].append(_Send(weakref.ref(tensor), tensor.clone(), work))
                self._match((src, dst))
            return work

    def irecv(self, tensor, src, group=None, tag=0):
        dst = self.rank()
        with self._lock:
            self._record("recv", src, dst)
            work = FakeWork()
            if (src, dst) not in self.hung:
                self._recvs[(src, dst)].append((tensor, work))
                self._match((src, dst))
            return work

    def send(self, tensor, dst, group=None, tag=0):
        self.isend(tensor, dst, group, tag).wait()

    def recv(self, tensor, src, group=None, tag=0):
        self.irecv(tensor, src, group, tag).wait()

    def install(self, monkeypatch) -> FakeNet:
        for name in ("isend", "irecv", "send", "recv"):
            monkeypatch.setattr(dist, name, getattr(self, name))
        loop = BatchReceiver._receive_loop

        def attributed(receiver):
            self.local.rank = receiver.topo.rank
            loop(receiver)

        monkeypatch.setattr(BatchReceiver, "_receive_loop", attributed)
        return self


class FakeStream:
    def __init__(self, device=None, name: str = ""):
        self.name = name or f"stream-{id(self):x}"
        self.waited: list = []

    def wait_event(self, event) -> None:
        self.waited.append(event)

    def synchronize(self) -> None:
        raise AssertionError("a stream-wide synchronize in the transport")


class FakeEvent:
    def __init__(self, enable_timing: bool = False):
        self.stream = None

    def record(self, stream=None) -> None:
        self.stream = stream if stream is not None else FakeCuda.current_stream()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, other) -> float:
        return 2.0  # milliseconds


class FakeCuda:
    """torch.cuda's streams and events as recording fakes; synchronize() raises (it must not be needed)."""

    local = threading.local()
    DEFAULT = FakeStream(name="default")
    recorded: list = []  # (tensor data_ptr, stream name) of every record_stream

    @classmethod
    def current_stream(cls, device=None) -> FakeStream:
        return getattr(cls.local, "stream", None) or cls.DEFAULT

    @classmethod
    def install(cls, monkeypatch) -> type[FakeCuda]:
        import contextlib

        cls.DEFAULT = FakeStream(name="default")
        cls.recorded = []

        @contextlib.contextmanager
        def stream(s):
            before = getattr(cls.local, "stream", None)
            cls.local.stream = s
            try:
                yield
            finally:
                cls.local.stream = before

        def no_sync(*args, **kwargs):
            raise AssertionError("torch.cuda.synchronize() called: it would wait on in-flight NCCL work")

        monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
        monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "current_stream", cls.current_stream)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        monkeypatch.setattr(torch.cuda, "synchronize", no_sync)
        monkeypatch.setattr(torch.Tensor, "record_stream",
                            lambda t, s: cls.recorded.append((t.data_ptr(), s.name)), raising=False)
        return cls
