"""topology.mode=hybrid under torchrun: a loader rank reading data.latent_cache feeds a model rank, and resumes exactly.

gloo on CPU, 1 loader + 1 model rank: 6 steps straight equal 3 steps, stop, resume to 6, loss for loss.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures.training import train_overrides

from sd3.commands.cache import build_latent_cache
from sd3.config_loader import load_config
from sd3.distributed.topology import Topology

WORKER = Path(__file__).parent / "workers" / "train_rank.py"


def torchrun(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "tiny-cpu", *args]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def test_hybrid_has_loader_ranks_as_loader_mode(tiny_models):
    cfg = load_config("tiny-cpu", [*tiny_models.overrides, "--topology.mode=hybrid", "--topology.loaders_per_node=1",
                                   "--topology.models_per_loader=2"])
    roles = [Topology.resolve(cfg.topology, 3, rank).role for rank in range(3)]
    assert roles == ["loader", "model", "model"]


@pytest.mark.slow
def test_gpu_ready_hybrid_run_resumes_exactly(tiny_models, shapes_phase, tmp_path):
    cache = tmp_path / "latents"
    common = ("--topology.mode=hybrid", "--topology.backend=gloo", "--topology.loaders_per_node=1",
              "--topology.models_per_loader=1", f"--data.latent_cache={cache}", "--train.deterministic=true",
              "--train.save_every=3", "--train.reset_optim=true", "--train.reset_wandb=true")
    cfg = load_config("tiny-cpu", train_overrides(tiny_models, shapes_phase, tmp_path, *common))
    assert build_latent_cache(cfg) == 0
    straight, split = tmp_path / "straight", tmp_path / "split"
    torchrun(train_overrides(tiny_models, shapes_phase, straight, *common, "--train.total_steps=6"))
    torchrun(train_overrides(tiny_models, shapes_phase, split, *common, "--train.total_steps=3"))
    torchrun(train_overrides(tiny_models, shapes_phase, split, *common, "--train.total_steps=6", "--train.resume=auto"))
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]
