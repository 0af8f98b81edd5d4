"""The real job: torchrun, gloo on CPU, 1 loader rank + 2 model ranks (tiny models, shapes data).

Run A is stopped by SIGTERM to one model rank; run B resumes it (`--train.resume=auto`) to step 30 (2 micro-batches
per step). Together they show: finite losses, checkpoints on disk at the agreed step, identical replicas, stall %
and images/s in the log, and every row of one pass consumed exactly once across the two model ranks and the
stop/resume.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.training import train_overrides
from safetensors.torch import load_file

from sd3.data.index import BucketIndex
from sd3.data.sampler import BucketBatchSampler
from sd3.train.checkpoint import load_checkpoint, resolve_checkpoint

WORKER = Path(__file__).parent / "workers" / "train_rank.py"
TOTAL_STEPS = 30
ACCUMULATION = 2  # DDP no_sync on the first micro-batch of every step
STOP_AFTER = 12
PER_RANK_BATCH = 4  # the loader draws 8 rows per micro-step: one pass over the 320 shapes rows is 42 micro-steps


def torchrun(args: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", str(WORKER),
           "tiny-cpu", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged(save_dir: Path) -> list[dict]:
    path = save_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_loader_and_two_model_ranks_stop_on_sigterm_and_resume(tiny_models, shapes_phase, tmp_path):
    save = tmp_path / "run"
    args = train_overrides(
        tiny_models, shapes_phase, save, "--topology.mode=loader", "--topology.backend=gloo",
        "--topology.loaders_per_node=1", "--topology.models_per_loader=2", f"--data.batch_size={PER_RANK_BATCH}",
        f"--train.total_steps={TOTAL_STEPS}", f"--train.accumulation_steps={ACCUMULATION}", "--train.save_every=5",
        "--train.ema_update_every=2",
        "--train.record_rows=true",
    )

    # Run A: SIGTERM to global rank 2 (model rank 1, not the one that saves) once step STOP_AFTER is logged.
    proc = torchrun(args)
    deadline = time.monotonic() + 150
    while not any(r["step"] >= STOP_AFTER for r in logged(save)):
        assert proc.poll() is None, f"run A ended early:\n{proc.communicate()[0][-3000:]}"
        assert time.monotonic() < deadline, f"run A did not reach step {STOP_AFTER} in time"
        time.sleep(0.2)
    os.kill(int((save / "pids" / "rank2.pid").read_text()), signal.SIGTERM)
    out_a = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out_a[-3000:]
    stopped = resolve_checkpoint(save)
    stop_step = load_checkpoint(stopped, map_location="cpu").train_state["train"]["step"]
    assert STOP_AFTER <= stop_step < TOTAL_STEPS and stopped.name == f"step-{stop_step:08d}"
    assert "stop requested" in out_a

    # Run B: resume to the end.
    proc = torchrun([*args, "--train.resume=auto"])
    out_b = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out_b[-3000:]
    assert f"resuming from {stopped}" in out_b
    assert "stall_pct=" in out_b and "images_per_s=" in out_b

    records = logged(save)
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))  # B picked up right after A's checkpoint
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 and 0 <= r["stall_pct"] <= 100 for r in records)
    assert all(r["stall_pct"] <= r["stall_pct_max"] <= 100 for r in records)  # the worst model rank's stall
    # The loader's peak memory crosses the wire (on CPU: its peak RSS, at least the encoders' weights).
    assert all(0.05 < r["loader_peak_memory_gb"] < 20 for r in records)
    final = save / f"step-{TOTAL_STEPS:08d}"
    assert resolve_checkpoint(save) == final

    # Both replicas hold the same weights, which are the ones checkpointed.
    rank0 = load_file(str(save / "weights" / "model-rank0.safetensors"))
    rank1 = load_file(str(save / "weights" / "model-rank1.safetensors"))
    saved = load_checkpoint(final, map_location="cpu").model_state
    assert all(torch.equal(rank0[k], rank1[k]) and torch.equal(rank0[k], saved[k]) for k in rank0)

    # Exactly once: the rows of the first pass (sampler steps < batches_per_epoch), over both model ranks and
    # both runs, have no duplicates and no gaps except rows skipped as bad.
    sampler = BucketBatchSampler(BucketIndex.load(shapes_phase.index_path), 2 * PER_RANK_BATCH, 0, 0, 1, 0)
    epoch = sampler.batches_per_epoch
    assert epoch <= TOTAL_STEPS * ACCUMULATION
    consumed: list[int] = []
    steps_seen = {0: [], 1: []}
    for rank in (0, 1):
        for line in (save / "rows" / f"rank{rank}.txt").read_text().splitlines():
            step, *ids = (int(v) for v in line.split())
            steps_seen[rank].append(step)
            if step < epoch:
                consumed += ids
    # each sampler step once per rank, in order
    assert steps_seen[0] == steps_seen[1] == list(range(TOTAL_STEPS * ACCUMULATION))
    assert len(consumed) == len(set(consumed)), "a row was trained on twice in one pass"
    expected = set(np.concatenate([sampler.batch(s).row_ids for s in range(epoch)]).tolist())
    assert set(consumed) <= expected
    skipped = sum(v for k, v in records[-1].items() if k.startswith("skipped_"))
    assert len(expected - set(consumed)) <= skipped
