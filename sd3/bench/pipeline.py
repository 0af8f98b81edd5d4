"""`sd3 bench pipeline`: the 3-process CPU job — 1 loader rank feeding 2 model ranks over gloo — measured.

Phase 1 (pipeline): the loader runs the real loader loop (`run_loader`: shards -> decode -> tiny text encoders +
VAE -> split -> send); each model rank receives with the real BatchReceiver and trains the MMDiT under DDP on the
model group (rectified-flow loss, bf16 autocast, AdamW) — the training step of `sd3 train`, without EMA, logging
or checkpoints, so the figures are the pipeline's. Per model rank: images/s and stall % (time waiting in
`next()` / wall time), after a few warm-up steps; the loader's busy time per step says whether it was faster.

Phase 2 (transport, side by side in the same job): the same bytes sent (a) as a Batch through BatchSender /
BatchReceiver (header + exact-shape tensors, receiving thread, queue) and (b) as one bare `dist.send` of a flat
uint8 tensor, alternating, each round started by a barrier; time from the barrier to "the receiver holds the
batch", median over rounds. Measured for the batch that was trained and for a reference-size batch (sd3-1b-256:
140 images per model rank, bf16), where bandwidth rather than latency dominates.

Goals (issue 5): stall <= 5 % when the loader is faster than the model; transport <= 1.5x the bare send.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP_STEPS = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny-cpu", help="preset (default tiny-cpu)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per model rank (first 3 are warm-up)")
    parser.add_argument("--rounds", type=int, default=21, help="transport rounds per size and method (median)")
    parser.add_argument("--ref-batch", type=int, default=140, help="reference batch per model rank (0 = skip)")
    parser.add_argument("--workdir", default="data/bench-pipeline", help="tiny models + shapes data (made if missing)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: out dir of a torchrun worker


# ---------------------------------------------------------------------------------------------------- preparation

def prepare(workdir: Path) -> list[str]:
    """Tiny models + a small shapes dataset in `workdir` (each stage skipped when done); config overrides to use
    them."""
    from sd3.data.synthetic import prepare_shapes
    from sd3.encoders.tiny import make_tiny, tiny_overrides

    models = workdir / "tiny-models"
    if not (models / "metaclip").exists():
        print(f"bench pipeline: make-tiny -> {models}", flush=True)
        make_tiny(models)
    data = prepare_shapes(workdir / "shapes", 600, max_res=64,
                          log=lambda stage, status: print(f"bench pipeline: {stage} {status}", flush=True))
    return tiny_overrides(models) + [
        f"--data.parquet_folder={data.phase}", f"--data.bucket_indices_path={data.index}",
        "--topology.mode=loader", "--topology.backend=gloo", "--topology.loaders_per_node=1",
        "--topology.models_per_loader=2"]


def main(args: argparse.Namespace) -> int:
    from sd3.bench import print_result
    from sd3.config_loader import load_config
    from sd3.distributed.topology import free_port

    overrides = prepare(Path(args.workdir)) + list(args.overrides)
    cfg = load_config(args.config, overrides)  # fail here, in one line, on a bad override
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "3",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{free_port()}",
               "-m", "sd3.bench.pipeline", "--worker", out, "--config", args.config, "--steps", str(args.steps),
               "--rounds", str(args.rounds), "--ref-batch", str(args.ref_batch), "--threads", str(args.threads),
               *overrides]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
        done = subprocess.run(cmd, env=env)
        if done.returncode:
            print(f"sd3 bench pipeline: error: the 3-process job failed (exit code {done.returncode})", file=sys.stderr)
            return 1
        reports = [json.loads((Path(out) / f"rank-{r}.json").read_text()) for r in range(3)]
    loader, models = reports[0], reports[1:]

    figures: dict = {
        "benchmark": "pipeline",
        "dtype": f"batch {cfg.encoders.batch_dtype}, model bf16 autocast",
        "processes": "1 loader + 2 model ranks, gloo, CPU",
        "steps": args.steps,
        "batch_per_model_rank": cfg.data.batch_size,
        "images_per_s_per_model_rank": [round(m["images_per_s"], 2) for m in models],
        "stall_pct_per_model_rank": [round(m["stall_pct"], 2) for m in models],
        "model_step_s": round(statistics.mean(m["compute_s_per_step"] for m in models), 4),
        "loader_busy_s_per_step": round(loader["busy_s_per_step"], 4),
    }
    figures["loader_faster_than_model"] = figures["loader_busy_s_per_step"] < figures["model_step_s"]
    figures["stall_goal_met"] = max(figures["stall_pct_per_model_rank"]) <= 5.0
    for name, sizes in models[0]["transport"].items():
        ours = statistics.mean(m["transport"][name]["ours_ms"] for m in models)
        bare = statistics.mean(m["transport"][name]["bare_ms"] for m in models)
        figures[f"transport_{name}_mb"] = round(sizes["mb"], 3)
        figures[f"transport_{name}_ms"] = round(ours, 3)
        figures[f"bare_send_{name}_ms"] = round(bare, 3)
        figures[f"transport_ratio_{name}"] = round(ours / bare, 3)
    ratios = [v for k, v in figures.items() if k.startswith("transport_ratio_")]
    figures["transport_goal_met"] = all(r <= 1.5 for r in ratios)

    for rank, m in enumerate(models, 1):
        print(f"model rank {rank}: {m['images_per_s']:.1f} images/s, stall {m['stall_pct']:.1f} %, "
              f"step {m['compute_s_per_step'] * 1000:.0f} ms compute + {m['wait_s_per_step'] * 1000:.1f} ms waiting")
    print(f"loader: {loader['busy_s_per_step'] * 1000:.0f} ms busy per step "
          f"({', '.join(f'{k} {v * 1000:.0f} ms' for k, v in loader['split_s_per_step'].items())})")
    for name in models[0]["transport"]:
        print(f"transport ({name}, {figures[f'transport_{name}_mb']} MB per model rank): "
              f"{figures[f'transport_{name}_ms']:.2f} ms vs bare gloo send {figures[f'bare_send_{name}_ms']:.2f} ms "
              f"-> {figures[f'transport_ratio_{name}']:.2f}x")
    print_result(figures)
    return 0


# ---------------------------------------------------------------------------------------------------- the workers

def worker(args: argparse.Namespace) -> int:
    import torch

    from sd3.config_loader import load_config
    from sd3.distributed.loader import run_loader
    from sd3.distributed.topology import exit_now, init_distributed

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    topo = init_distributed(cfg)
    out = Path(args.worker)
    if topo.is_loader:
        report = {"rc": run_loader(cfg, topo, 0)}
        report.update(loader_busy(topo))
        report["transport"] = transport_phase(cfg, topo, args)
    else:
        report = train_phase(cfg, topo, args.steps)
        report["transport"] = transport_phase(cfg, topo, args)
    (out / f"rank-{topo.rank}.json").write_text(json.dumps(report))
    exit_now(int(report.get("rc", 0)))
    return 0



def loader_busy(topo) -> dict:
    """The loader's time per step, from the cumulative timings the model ranks saw (sent back by rank 1)."""
    import torch
    import torch.distributed as dist

    from sd3.distributed.stats import TIMING_FIELDS

    values = torch.zeros(len(TIMING_FIELDS) + 1, dtype=torch.float64)
    dist.broadcast(values, src=topo.loader_to_model[topo.rank][0])
    steps = max(values[-1].item(), 1.0)
    split = {k: v / steps for k, v in zip(TIMING_FIELDS, values[:-1].tolist(), strict=True) if k != "wait"}
    return {"busy_s_per_step": sum(split.values()), "split_s_per_step": split}


def train_phase(cfg, topo, steps: int) -> dict:
    """Train `steps` steps on the loader's batches; figures after WARMUP_STEPS."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from sd3.distributed.receiver import BatchReceiver
    from sd3.distributed.stats import TIMING_FIELDS
    from sd3.model import build_model
    from sd3.seeds import generator
    from sd3.train.flow import training_loss

    torch.manual_seed(0)
    model = DistributedDataParallel(build_model(cfg.model), process_group=topo.model_group)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    receiver = BatchReceiver(topo, 0)
    images = wait = compute = 0.0
    start = 0.0
    stats = None
    for step in range(steps):
        if step == WARMUP_STEPS:
            dist.barrier(group=topo.model_group)
            images = wait = compute = 0.0
            start = time.perf_counter()
        batch, stats = receiver.next()
        t0 = time.perf_counter()
        # The trainer's objective (CFG dropout included) and its random stream for this rank and micro-step.
        gen = generator(cfg.train.seed, step, topo.model_rank, "train")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = training_loss(model, batch.to(torch.device("cpu"), torch.float32), gen, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        compute += time.perf_counter() - t0
        wait += stats.wait_s
        images += len(batch)
    elapsed = time.perf_counter() - start
    receiver.stop(steps)
    measured = steps - WARMUP_STEPS
    if topo.consumer_index == 0:  # tell the loader what it spent per step (its own view ends at run_loader's exit)
        values = torch.tensor([stats.timings.get(k, 0.0) for k in TIMING_FIELDS] + [steps], dtype=torch.float64)
    else:
        values = torch.zeros(len(TIMING_FIELDS) + 1, dtype=torch.float64)
    dist.broadcast(values, src=topo.loader_to_model[topo.my_loader][0])
    return {"images_per_s": images / elapsed, "stall_pct": 100.0 * wait / elapsed,
            "compute_s_per_step": compute / measured, "wait_s_per_step": wait / measured,
            "final_loss": float(loss.item())}


def transport_phase(cfg, topo, args) -> dict:
    """Our transport vs a bare gloo send of the same bytes, per size; on model ranks the times in ms."""
    import torch

    from sd3.batch import Batch

    m = cfg.model
    side = m.max_res // m.vae_downsample
    dtype = torch.float32 if cfg.encoders.batch_dtype == "fp32" else torch.bfloat16
    sizes = {"trained": (cfg.data.batch_size, m.in_channels, side, m.text_tokens, m.context_dim, m.pooled_dim, dtype)}
    if args.ref_batch:
        sizes["reference"] = (args.ref_batch, 16, 32, 77, 2304, 768, torch.bfloat16)  # sd3-1b-256, 256 px
    results = {}
    for i, (name, (b, c, s, t, d, p, dt)) in enumerate(sizes.items()):
        n = b * len(topo.consumers) if topo.is_loader else b
        batch = Batch(torch.randn(n, c, s, s).to(dt), torch.randn(n, 2 * t, d).to(dt), torch.randn(n, p).to(dt),
                      torch.arange(n, dtype=torch.int64))
        results[name] = measure(topo, batch, args.rounds, channel=f"bench-{i}")
    return results


def measure(topo, batch, rounds: int, channel: str) -> dict:
    """Alternate rounds of (ours, bare); each starts with a barrier over all ranks and ends when the receiver holds
    it."""
    import torch
    import torch.distributed as dist

    from sd3.distributed.receiver import BatchReceiver
    from sd3.distributed.sender import BatchSender

    if topo.is_loader:
        sender = BatchSender(topo, channel=channel)
        parts = batch.split(len(topo.consumers))
        flats = [torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in part.tensors()]) for part in parts]
        for step in range(rounds):
            dist.barrier()
            for consumer, part in zip(topo.consumers, parts, strict=True):  # Batch.split gives exactly n parts
                sender.send(consumer, step, part)
            sender.flush(topo.timeout_s)
            dist.barrier()
            works = [dist.isend(flat, dst=consumer, tag=99)
                     for consumer, flat in zip(topo.consumers, flats, strict=True)]
            for w in works:
                w.wait()
        while sender.active:  # the consumers ask to stop; answer with DONE
            sender.poll()
            time.sleep(0.01)
        sender.close()
        return {"mb": flats[0].numel() / 1e6}
    receiver = BatchReceiver(topo, 0, channel=channel)
    nbytes = sum(t.numel() * t.element_size() for t in batch.tensors())
    buf = torch.empty(nbytes, dtype=torch.uint8)
    ours, bare = [], []
    for _ in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        got, _ = receiver.next()
        ours.append(time.perf_counter() - t0)
        assert [t.shape for t in got.tensors()] == [t.shape for t in batch.tensors()]
        dist.barrier()
        t0 = time.perf_counter()
        dist.recv(buf, src=topo.my_loader, tag=99)
        bare.append(time.perf_counter() - t0)
    receiver.stop(rounds)
    return {"mb": nbytes / 1e6, "ours_ms": 1000 * statistics.median(ours), "bare_ms": 1000 * statistics.median(bare)}


if __name__ == "__main__":
    from sd3.commands.arguments import parse_command_args

    parsed = parse_command_args(sys.modules[__name__], "sd3.bench.pipeline", "worker", sys.argv[1:])
    sys.exit(worker(parsed))
