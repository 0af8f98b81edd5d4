"""One rank of a 3-rank job (1 loader feeding 2 model ranks) that exercises sd3.distributed for real over gloo.

Run under torchrun (`python transport_job.py SCENARIO STEPS OUT_DIR`), or forked by fork_jobs.py (`run()`). The
loader runs the real loop (sd3.distributed.loader.serve) with a stand-in producer of random Batches whose shapes
change every step (as buckets do); each model rank receives with the real BatchReceiver, checks every batch against
the producer's own output, and writes what it saw to OUT_DIR/rank-R.json before exiting.

Scenarios: ok (train STEPS steps, then stop; the loader gets SIGUSR1 at step 6 and keeps serving, flagging its
headers), loader_start_error (the real run_loader with a bucket index that does not exist), loader_error (the
producer raises at step 3), loader_kill (the loader SIGKILLs itself at step 3), loader_hang (the loader sleeps at
step 3), model_fail (rank 2 reports a failure at step 2 via fail()), model_kill (rank 2 SIGKILLs itself at step 2),
model_stop (rank 2 SIGSTOPs itself at step 2: its peer waits in the all_reduce, and the loader must name rank 2),
stop_lost (the model ranks ask to stop at step 5 after the loader SIGKILLed itself producing step 8).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sd3.batch import Batch
from sd3.config import Config
from sd3.distributed import signals
from sd3.distributed.errors import LoaderFailed
from sd3.distributed.loader import run_loader, serve
from sd3.distributed.receiver import BatchReceiver
from sd3.distributed.sender import BatchSender
from sd3.distributed.topology import exit_now, init_distributed

PER_RANK = 3
BUCKETS = [(8, 8), (4, 12), (12, 4), (6, 6)]  # latent (h, w) per step, cycling: exact shapes must survive
T, D, P, C = 5, 7, 3, 4


def make_batch(step: int) -> Batch:
    """The stand-in loader output of `step` (deterministic, so a model rank can recompute and compare)."""
    g = torch.Generator().manual_seed(1000 + step)
    n = 2 * PER_RANK - (step % 3 == 1)  # sometimes odd: the split is uneven
    if step % 7 == 5:
        n = 1  # one consumer gets an empty slice
    h, w = BUCKETS[step % len(BUCKETS)] if step != 9 else (160, 160)  # step 9: a large batch (> 1 MB per slice)
    return Batch(
        torch.randn(n, C, h, w, generator=g),  # (B, C, h, w)
        torch.randn(n, 2 * T, D, generator=g).to(torch.bfloat16),  # (B, 2T, D)
        torch.randn(n, P, generator=g),  # (B, P)
        torch.arange(n, dtype=torch.int64) + 100 * step,  # (B,)
    )


def run(scenario: str, steps: int, out_dir: Path) -> int:
    cfg = Config()
    cfg.topology.loaders_per_node, cfg.topology.models_per_loader = 1, 2
    cfg.topology.max_in_flight = 2
    cfg.topology.timeout_minutes = 0.1 if scenario == "loader_hang" else 1.0
    topo = init_distributed(cfg)
    result: dict = {"rank": topo.rank, "role": topo.role}
    start = time.perf_counter()

    def write(rc: int, message: str = "") -> int:
        result.update(rc=rc, message=message, elapsed=time.perf_counter() - start)
        (out_dir / f"rank-{topo.rank}.json").write_text(json.dumps(result))
        return rc

    if topo.is_loader and scenario == "loader_start_error":
        cfg.data.bucket_indices_path = str(out_dir / "no-such-index.npz")
        return write(run_loader(cfg, topo, start_step=0))
    if topo.is_loader:
        signals.install()
        sender = BatchSender(topo)
        max_seen = 0
        original_send = sender.send

        def send(consumer, step, batch, *stats):  # timings, skipped, flags, peak memory: passed on as they are
            nonlocal max_seen
            original_send(consumer, step, batch, *stats)
            if consumer not in sender.finished:  # DONE headers go beyond the window, on purpose
                max_seen = max(max_seen, len(sender.in_flight[consumer]))

        sender.send = send

        def produce(step: int):
            if step == 3 and scenario == "loader_error":
                raise RuntimeError("boom in the stand-in producer")
            if step == 3 and scenario == "loader_kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if step == 3 and scenario == "loader_hang":
                time.sleep(3600)
            if step == 8 and scenario == "stop_lost":
                os.kill(os.getpid(), signal.SIGKILL)
            if step == 6 and scenario == "ok":
                os.kill(os.getpid(), signal.SIGUSR1)  # pre-emption notice: forwarded, not obeyed
            return make_batch(step), {"decode": 0.001 * step, "vae": 0.002 * step}, {"decode_error": step}

        rc = serve(topo, sender, produce, start_step=0)
        result["max_in_flight_seen"] = max_seen
        return write(rc)

    receiver = BatchReceiver(topo, start_step=0)
    seen, prefetched, first_flagged = [], 0, None
    try:
        for step in range(steps):
            if scenario == "model_fail" and topo.rank == 2 and step == 2:
                receiver.fail("stand-in trainer error")
                return write(4, "stand-in trainer error")
            if scenario == "model_kill" and topo.rank == 2 and step == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            if scenario == "stop_lost" and step == 5:
                time.sleep(1.0)  # the loader dies meanwhile
                receiver.stop(step)  # must not report a clean stop
            batch, stats = receiver.next()
            expected = make_batch(step).split(2)[topo.consumer_index]
            for got, want in zip(batch.tensors(), expected.tensors(), strict=True):
                assert got.shape == want.shape and got.dtype == want.dtype, (step, got.shape, want.shape)
                assert torch.equal(got, want), f"step {step}: payload differs"
            assert stats.step == step and stats.loader_rank == topo.my_loader
            if stats.stop_requested and first_flagged is None:
                first_flagged = step
            assert stats.skipped["decode_error"] == step and abs(stats.timings["vae"] - 0.002 * step) < 1e-5
            seen.append({"step": step, "rows": batch.row_ids.tolist(), "latents": list(batch.latents.shape)})
            # DDP's group works beside the transport.
            total = torch.ones(1)
            dist.all_reduce(total, group=topo.model_group)
            assert total.item() == 2
            time.sleep(0.05)  # "compute": the next batch should arrive meanwhile
            if receiver._queue.full():  # batch step+1 fully received before next() asks for it
                prefetched += 1
        receiver.stop(steps)
    except (LoaderFailed, RuntimeError) as e:  # RuntimeError: the other model rank vanished mid all_reduce
        result["seen"] = seen
        receiver.fail(str(e))
        # The root cause, as a trainer reports it: the loader's failure if the receiver saw one.
        cause = e if isinstance(e, LoaderFailed) else receiver.failure(wait_s=2.0)
        result["cause"] = str(cause) if cause is not None else ""
        print(f"rank {topo.rank}: {e}", file=sys.stderr, flush=True)
        return write(3 if isinstance(e, LoaderFailed) else 5, str(e))
    result.update(seen=seen, prefetched=prefetched, first_flagged=first_flagged)
    return write(0)


if __name__ == "__main__":
    # exit_now: a failure leaves the receiving thread blocked in a gloo wait, which a normal exit turns into SIGABRT.
    exit_now(run(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
