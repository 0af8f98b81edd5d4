"""The transport under NCCL's semantics, simulated on the CPU (issue 18 items 1, 3, 4, 5, 14; `-k gpu_ready`).

Ranks are threads of this process talking through tests/distributed/fake_nccl.py: a Work completes only once the
peer's matching operation is posted (or never), CUDA streams and events are recording fakes, and
torch.cuda.synchronize raises. Loader: the real serve() loop and BatchSender; model ranks: the real BatchReceiver.
"""

from __future__ import annotations

import atexit
import datetime
import re
import threading
import time

import pytest
import torch
import torch.distributed as dist

from distributed.fake_nccl import FakeCuda, FakeNet
from sd3.batch import Batch
from sd3.config import Config
from sd3.config_loader import load_config
from sd3.distributed import heartbeat, topology
from sd3.distributed.errors import LoaderFailed
from sd3.distributed.loader import serve
from sd3.distributed.receiver import BatchReceiver
from sd3.distributed.sender import BatchSender
from sd3.distributed.topology import Topology
from sd3.encoders.timing import timed

STEPS = 6
CUDA = torch.device("cuda", 0)  # only a name: nothing is allocated there


def topologies(timeout_s: float = 5.0) -> tuple[list[Topology], dist.Store]:
    cfg = Config().topology
    cfg.loaders_per_node, cfg.models_per_loader, cfg.max_in_flight = 1, 2, 2
    store = dist.HashStore()
    topos = [Topology.resolve(cfg, 3, r, 3) for r in range(3)]
    for t in topos:
        t.backend, t.timeout_s, t.store = "nccl", timeout_s, store  # NCCL's path; tensors stay on the CPU
    return topos, store


def make_batch(step: int) -> Batch:
    n = 0 if step == 2 else 3 + step % 2  # step 2: every row skipped; odd steps: an uneven split
    h, w = [(4, 4), (2, 6), (6, 2)][step % 3]
    g = torch.Generator().manual_seed(step)
    return Batch(torch.randn(n, 4, h, w, generator=g), torch.randn(n, 6, 5, generator=g).bfloat16(),
                 torch.randn(n, 3, generator=g), torch.arange(n) + 10 * step)


def produce_on_cuda(fail_at: int | None = None):
    timings: dict[str, float] = {}

    def produce(step: int):
        if step == fail_at:
            raise RuntimeError("boom")
        with timed(timings, "vae", CUDA):  # CUDA events, never a device-wide synchronize
            batch = make_batch(step)
        return batch, dict(timings), {"decode_error": step}
    return produce


class World:
    """The loader and both model ranks as threads; `models(fn)` runs fn(receiver) per model rank."""

    def __init__(self, net: FakeNet, timeout_s: float = 5.0):
        self.net = net
        self.topos, self.store = topologies(timeout_s)
        self.results: dict[int, object] = {}
        self.threads: list[threading.Thread] = []

    def _start(self, rank: int, fn) -> None:
        def main():
            self.net.local.rank = rank
            try:
                self.results[rank] = fn(self.topos[rank])
            except Exception as e:  # noqa: BLE001 - the test inspects it
                self.results[rank] = e
        thread = threading.Thread(target=main, name=f"rank-{rank}-main", daemon=True)
        self.threads.append(thread)
        thread.start()

    def run(self, loader, model) -> dict[int, object]:
        self._start(0, loader)
        for r in (1, 2):
            self._start(r, model)
        for t in self.threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in self.threads), "a rank is stuck"
        return self.results


def serve_all(produce):
    return lambda topo: serve(topo, BatchSender(topo), produce, 0)


def consume(steps: int, stop: bool = True, fail_rank: int | None = None):
    def model(topo: Topology):
        receiver = BatchReceiver(topo, 0)
        seen = []
        try:
            for step in range(steps):
                if topo.rank == fail_rank and step == 2:
                    receiver.fail("stand-in trainer error")
                    # fail() arms an exit hook for a real process group's teardown (a receive thread still blocked
                    # then would abort the process); the fake network never completes this rank's pending receive,
                    # so the hook would end the whole pytest process with code 1.
                    atexit.unregister(receiver._exit_if_blocked)
                    return seen
                batch, stats = receiver.next()
                want = make_batch(step).split(2)[topo.consumer_index]
                assert all(torch.equal(a, b) for a, b in zip(batch.tensors(), want.tensors(), strict=True)), step
                seen.append((step, len(batch), stats.timings["vae"]))
            if stop:
                receiver.stop(steps)
            return seen
        except LoaderFailed as e:
            return e
    return model


@pytest.fixture
def net(monkeypatch) -> FakeNet:
    FakeCuda.install(monkeypatch)
    return FakeNet().install(monkeypatch)


def kinds(seq) -> list[str]:
    return [k for k, _ in seq]


def test_gpu_ready_sequences_match_per_pair_with_done_and_empty_slices(net):
    results = World(net).run(serve_all(produce_on_cuda()), consume(STEPS))
    assert results[0] == 0 and net.errors == []
    for r in (1, 2):
        assert [s for s, _, _ in results[r]] == list(range(STEPS))
        assert results[r][-1][2] == pytest.approx(0.002 * STEPS)  # timed by events: 2 ms each, per step
        assert net.sent[(0, r)] == net.received[(0, r)]  # (kind, bytes) for every message, in order
        assert kinds(net.sent[(0, r)]).count("DATA") >= STEPS and kinds(net.sent[(0, r)])[-1] == "DONE"
    assert results[1][2][1] == 0 and results[2][2][1] == 0  # the empty step arrived, shaped


def test_gpu_ready_error_and_stop_reach_every_consumer_in_sequence(net):
    results = World(net).run(serve_all(produce_on_cuda(fail_at=3)), consume(STEPS))
    assert results[0] == 1 and net.errors == []
    for r in (1, 2):
        assert isinstance(results[r], LoaderFailed) and "failed at step 3: RuntimeError: boom" in str(results[r])
        assert net.sent[(0, r)] == net.received[(0, r)] and kinds(net.sent[(0, r)])[-2:] == ["ERROR", "message"]

    net2 = FakeNet()
    net2.local = net.local
    for name in ("isend", "irecv", "send", "recv"):
        setattr(dist, name, getattr(net2, name))  # monkeypatch restores the originals at the end
    results = World(net2).run(serve_all(produce_on_cuda()), consume(STEPS, fail_rank=2))
    assert results[0] == 1 and net2.errors == []
    assert isinstance(results[1], LoaderFailed) and "stopped because model rank 2 failed" in str(results[1])
    assert net2.sent[(0, 1)] == net2.received[(0, 1)] and kinds(net2.sent[(0, 1)])[-2:] == ["STOP", "message"]


def test_gpu_ready_the_fake_catches_a_mutated_send(net):
    net.local.rank = 0
    t = torch.ones(4)
    work = dist.isend(t, dst=1)
    t.fill_(2.0)  # what the sender must never do before `work` completes
    net.local.rank = 1
    dist.irecv(torch.empty(4), src=0).wait()
    assert work.is_completed() and net.errors == ["(0, 1): a sent tensor was mutated before its Work completed"]


def test_gpu_ready_a_never_completing_send_gives_the_named_error_within_the_timeout(net):
    net.hung = {(0, 2)}  # rank 2 never takes anything
    start = time.perf_counter()
    world = World(net, timeout_s=1.0)
    world.topos[1].timeout_s = 30.0  # rank 1 waits for the loader's STOP rather than timing out by itself
    results = world.run(serve_all(produce_on_cuda()), consume(STEPS))
    elapsed = time.perf_counter() - start
    assert results[0] == 1 and elapsed < 1.0 * 2 + 5  # the loader's wait, then the STOP to rank 1
    assert isinstance(results[2], LoaderFailed)
    assert str(results[2]) == ("no header of step 0 from loader rank 0 within 0.0166667 min "
                               "(topology.timeout_minutes): is it hung?")
    assert isinstance(results[1], LoaderFailed) and "model rank 2 has not taken step 0" in str(results[1])


def test_gpu_ready_receives_run_on_their_own_stream_and_the_compute_stream_waits_on_an_event(net):
    World(net).run(serve_all(produce_on_cuda()), consume(STEPS))
    recvs = [op for op in net.ops if op[0] == "recv"]
    assert recvs and all(stream != "default" for *_, stream in recvs)
    assert all(thread == "sd3-recv-from-0" for _, _, _, thread, _ in recvs)
    # One event per batch for the trainer's (default) stream, and every non-empty tensor recorded on it.
    assert len(FakeCuda.DEFAULT.waited) == 2 * STEPS
    assert {stream for _, stream in FakeCuda.recorded} == {"default"}
    assert all(event.stream is not FakeCuda.DEFAULT for event in FakeCuda.DEFAULT.waited)


def test_gpu_ready_timing_uses_events_not_a_device_synchronize(monkeypatch):
    FakeCuda.install(monkeypatch)
    timings: dict[str, float] = {}
    with timed(timings, "gemma", CUDA):
        pass
    with timed(timings, "gemma", CUDA):
        pass
    assert timings == {"gemma": pytest.approx(0.004)}


def test_gpu_ready_warm_up_makes_every_pair_and_group_on_the_calling_thread(net, monkeypatch):
    reduced = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: reduced.append(threading.current_thread().name))
    topos, _ = topologies()
    threads = []
    for t in topos:
        def main(t=t):
            net.local.rank = t.rank
            topology.warm_up(t.rank, t.loader_to_model, "model-group" if t.is_model else None, torch.device("cpu"))
        threads.append(threading.Thread(target=main, name=f"rank-{t.rank}-main"))
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=10)
    assert sorted(reduced) == ["rank-1-main", "rank-2-main"]
    assert sorted((op, src, dst, thread) for op, src, dst, thread, _ in net.ops) == [
        ("recv", 0, 1, "rank-1-main"), ("recv", 0, 2, "rank-2-main"),
        ("send", 0, 1, "rank-0-main"), ("send", 0, 2, "rank-0-main")]


def test_gpu_ready_the_stalest_heartbeat_is_named_first(net, caplog):
    """Rank 2 stopped (its heartbeat is a minute old); rank 1, stuck behind it, stops taking batches first."""
    world = World(net, timeout_s=1.0)
    net.hung = {(0, 1)}
    world.store.set("sd3/heartbeat/rank2", f"{time.time() - 60:.3f}:1")
    beats = [heartbeat.Heartbeat(world.store, r, interval_s=0.2) for r in (0, 1)]
    try:
        results = world.run(serve_all(produce_on_cuda()), consume(STEPS))
    finally:
        for b in beats:
            b.close()
    hung = r"rank 2 looks hung \(no heartbeat for 6\d s, last at step 1\); "
    assert results[0] == 1  # the loader timed out on rank 1 but names rank 2 first
    assert re.search("loader rank 0 stops at step 2: " + hung + "model rank 1 has not taken step 0", caplog.text)
    assert isinstance(results[1], LoaderFailed) and re.match(hung + "no header of step 0", str(results[1]))


def test_heartbeats_stalest_first_and_done_ranks_are_never_blamed():
    store = dist.HashStore()
    now = time.time()
    store.set("sd3/heartbeat/rank0", f"{now - 1:.3f}:7")
    store.set("sd3/heartbeat/rank1", f"{now - 30:.3f}:5")
    store.set("sd3/heartbeat/rank2", "done:9")
    beats = heartbeat.read_beats(store, [0, 1, 2, 3], now=now)
    assert [b.rank for b in beats] == [1, 0, 2]  # 3 never beat: not judged
    assert heartbeat.stalest(store, [0, 1, 2]).rank == 1
    assert heartbeat.name_hung_first(store, [0, 2], "x") == "x"
    assert heartbeat.name_hung_first(store, [0, 1, 2], "x", me=1) == "x"  # a rank never blames itself


def test_gpu_ready_process_group_timeout_exceeds_the_transport_timeout(monkeypatch):
    """init_distributed: the store comes from the rendezvous and is passed on; the group outlives the transport."""
    captured = {}
    base = dist.HashStore()
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setattr(dist, "rendezvous", lambda url, rank, world_size, timeout: iter([(base, rank, world_size)]))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: captured.update(kw))
    monkeypatch.setattr(dist, "new_group", lambda ranks, timeout: captured.update(group_timeout=timeout) or "group")
    monkeypatch.setattr(topology, "warm_up", lambda *args: captured.update(warm_up=args))
    cfg = Config()
    cfg.topology.loaders_per_node, cfg.topology.models_per_loader, cfg.topology.backend = 1, 2, "gloo"
    topo = topology.init_distributed(cfg)
    try:
        margin = datetime.timedelta(seconds=topo.timeout_s + 60)
        assert captured["timeout"] > margin and captured["group_timeout"] > margin
        assert topo.store is base and isinstance(captured["store"], dist.PrefixStore)
        assert captured["device_id"] is None  # gloo; with NCCL it is this rank's GPU
        assert captured["warm_up"][:3] == (1, topo.loader_to_model, "group") and topo.model_group == "group"
        assert topo.heartbeat is not None and base.check(["sd3/heartbeat/rank1"])
    finally:
        topology.shutdown_distributed()
    assert base.get("sd3/heartbeat/rank1").startswith(b"done:")


@pytest.mark.parametrize("preset", ["sd3-1b-256", "sd3-1b-512", "sd3-1b-1024"])
def test_gpu_ready_reference_presets_send_bf16_batches(preset):
    assert load_config(preset).encoders.batch_dtype == "bf16"  # half the bytes of fp32 per loader step
