"""Exact resume across a changed topology (mosaicml streaming's guarantee): a run checkpointed under one layout and
resumed under another — another number of loaders, model ranks, per-rank batch or data mode — trains on every row
of the epoch once, none missing and none twice (train.record_rows audits what each model rank trained on).

One epoch, four layouts in a chain, each resuming the previous one's checkpoint with --train.resume=auto:
colocated, 1 rank of 16 -> loader mode 1 loader + 2 model ranks of 16 -> 2 loaders + 2 model ranks of 16 ->
1 loader + 2 model ranks of 8 (per-rank batch 16 -> 8).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.training import train_overrides

from sd3.commands.train import run
from sd3.config_loader import load_config
from sd3.data.index import BucketIndex
from sd3.data.sampler import BucketBatchSampler

WORKER = Path(__file__).parent / "workers" / "train_rank.py"
NEW_LAYOUT = "continuing on a new layout"


def torchrun(nproc: int, args: list[str]) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(WORKER),
           "tiny-cpu", *args]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout


def recorded(save: Path) -> list[tuple[int, list[int]]]:
    """(sampler step, row ids) of every micro-batch any model rank trained on, over all runs."""
    out = []
    for path in sorted((save / "rows").glob("rank*.txt")):
        for line in path.read_text().splitlines():
            step, *ids = (int(v) for v in line.split())
            out.append((step, ids))
    return out


@pytest.mark.slow
def test_elastic_resume_trains_each_row_of_the_epoch_once(tiny_models, shapes_phase, tmp_path, capfd):
    save = tmp_path / "run"
    base = train_overrides(tiny_models, shapes_phase, save, "--train.record_rows=true", "--train.save_every=1",
                           "--train.resume=auto", "--topology.backend=gloo")
    loader = ["--topology.mode=loader"]
    # 1. colocated, one process, batch 16: steps 1-3 (48 rows).
    assert run(load_config("tiny-cpu", [*base, "--topology.mode=colocated", "--data.batch_size=16",
                                        "--train.total_steps=3"])) == 0
    # 2. 1 loader + 2 model ranks, 16 each: steps 4-5 (64 rows), the rest of the epoch re-planned for 32 per step.
    out = torchrun(3, [*base, *loader, "--topology.loaders_per_node=1", "--topology.models_per_loader=2",
                       "--data.batch_size=16", "--train.total_steps=5"])
    assert NEW_LAYOUT in out
    # 3. 2 loaders + 2 model ranks ({0: [2], 1: [3]}), 16 each: the same 32 rows per step, split another way.
    out = torchrun(4, [*base, *loader, "--topology.loader_to_model={0: [2], 1: [3]}", "--data.batch_size=16",
                       "--train.total_steps=7"])
    assert NEW_LAYOUT in out
    # 4. 1 loader + 2 model ranks of 8: the rest of the epoch and into the next.
    out = torchrun(3, [*base, *loader, "--topology.loaders_per_node=1", "--topology.models_per_loader=2",
                       "--data.batch_size=8", "--train.total_steps=22"])
    assert NEW_LAYOUT in out
    # ... and resuming with the same layout is exact again.
    out = torchrun(3, [*base, *loader, "--topology.loaders_per_node=1", "--topology.models_per_loader=2",
                       "--data.batch_size=8", "--train.total_steps=23"])
    assert "continuing exactly" in out and NEW_LAYOUT not in out

    # Where epoch 1 begins in the final layout's stream (its data position carries the earlier layouts' cursors).
    meta = json.loads((save / "step-00000023" / "meta.json").read_text())
    position = meta["sampler"]
    sampler = BucketBatchSampler(BucketIndex.load(shapes_phase.index_path), 16, 0, 0, 1, 0, [16])
    assert sampler.load_state_dict(position) == "exact" and position["segment_epoch"] == 0
    epoch_end = next(s for s in range(position["segment_start"], meta["micro_step"]) if sampler.epoch_of(s) == 1)
    assert epoch_end < meta["micro_step"], "the chain did not finish the first epoch"

    batches = recorded(save)
    assert sorted({step for step, _ in batches}) == list(range(meta["micro_step"]))  # every step trained, once each
    first_epoch = [r for step, ids in batches if step < epoch_end for r in ids]
    assert len(first_epoch) == len(set(first_epoch)), "a row was trained on twice in the epoch"
    first_layout = BucketBatchSampler(BucketIndex.load(shapes_phase.index_path), 16, 0)
    kept = {r for s in range(first_layout.batches_per_epoch) for r in first_layout.batch(s).row_ids.tolist()}
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    skipped = sum(v for k, v in records[-1].items() if k.startswith("skipped_"))
    missing = kept - set(first_epoch)
    assert len(missing) <= skipped, f"{len(missing)} rows of the epoch never trained on ({skipped} skipped as bad)"
    assert set(first_epoch) <= kept
