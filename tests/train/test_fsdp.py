"""FSDP2 model ranks (train.parallelism = fsdp): torchrun, 2 colocated model ranks over gloo on CPU, tiny-cpu.

(a) 5 steps under FSDP give DDP's losses (bf16 compute both ways; FSDP reduces in fp32 like DDP's all-reduce);
(b) a DDP checkpoint resumes under FSDP and an FSDP checkpoint under DDP: the weights, EMA and optimizer state the
resumed run holds are the saved ones, and it goes on with finite losses. Plus the one-process parts: the
name-keyed optimizer state, old int-keyed states and () scalars loading.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.training import train_overrides, validation_overrides
from PIL import Image
from safetensors.torch import load_file

from sd3.model.layers import TextPartEmbedding, TimestepEmbedding
from sd3.train.ema import EMA
from sd3.train.fsdp import ModelState, OptimizerState, is_name_keyed

WORKER = Path(__file__).parent / "workers" / "fsdp_rank.py"
STEPS = 5
MORE = 2  # steps the resumed runs take after the checkpoint


def torchrun(args: list[str], timeout: float = 120) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           "tiny-cpu", *args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def losses(save_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]  # not the validation lines


@pytest.fixture(scope="module")
def fsdp_runs(tiny_models, shapes_phase, tmp_path_factory):
    """Four torchruns: DDP and FSDP from scratch for STEPS steps, then each checkpoint resumed in the other mode."""
    root = tmp_path_factory.mktemp("fsdp")

    def args(save: Path, mode: str, *extra: str) -> list[str]:
        return train_overrides(tiny_models, shapes_phase, save, "--topology.mode=colocated",
                               "--topology.backend=gloo", f"--train.parallelism={mode}",
                               "--train.accumulation_steps=2", f"--train.save_every={STEPS}", *extra)

    runs = {}
    for mode in ("ddp", "fsdp"):  # validating at the last step: under FSDP rank 0 gathers the sharded weights
        runs[mode] = root / mode
        torchrun(args(runs[mode], mode, f"--train.total_steps={STEPS}", f"--train.grad_norms_every={STEPS}",
                      *validation_overrides(shapes_phase, STEPS)))
    for saved, mode in (("ddp", "fsdp"), ("fsdp", "ddp")):
        runs[f"{saved}->{mode}"] = root / f"{saved}-to-{mode}"
        torchrun(args(runs[f"{saved}->{mode}"], mode, f"--train.total_steps={STEPS + MORE}",
                      f"--train.resume={runs[saved] / f'step-{STEPS:08d}'}", "--train.reset_optim=false"))
    return runs


@pytest.mark.slow
def test_fsdp_losses_equal_ddp(fsdp_runs):
    ddp, fsdp = losses(fsdp_runs["ddp"]), losses(fsdp_runs["fsdp"])
    print(f"\nDDP  losses: {ddp}\nFSDP losses: {fsdp}")
    assert len(ddp) == len(fsdp) == STEPS
    assert all(math.isfinite(v) for v in ddp + fsdp)
    # bf16 compute on both sides, different reduction order (all-reduce vs reduce-scatter): equal to ~1e-4.
    assert fsdp == pytest.approx(ddp, rel=2e-3, abs=2e-3)


@pytest.mark.slow
def test_fsdp_block_norms_are_ddps(fsdp_runs):
    """Per-block gradient and weight norms of the full tensors, not of one rank's shards."""
    def norms(run: Path) -> dict[str, float]:
        found = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = next(r for r in found if r["step"] == STEPS and "loss" in r)
        return {k: v for k, v in last.items() if k.startswith(("grad_norm/", "weight_norm/"))}

    ddp, fsdp = norms(fsdp_runs["ddp"]), norms(fsdp_runs["fsdp"])
    assert "grad_norm/blocks.0" in ddp and "weight_norm/blocks.0" in ddp and ddp.keys() == fsdp.keys()
    # One rank's shard would give ~1/sqrt(2) of the norm (29 % less). The weights agree to rounding; the gradients
    # within bf16's accumulation error where bf16 is native (FSDP computes with bf16 parameters, DDP with fp32).
    for key in ddp:
        assert fsdp[key] == pytest.approx(ddp[key], rel=1e-3 if key.startswith("weight") else 0.25), key


@pytest.mark.slow
def test_fsdp_validates_like_ddp(fsdp_runs):
    """The held-out loss and the EMA grid of an FSDP run are DDP's: rank 0 validates on the gathered full weights
    while the other rank joins the gathers (no hang, no skipped validation)."""
    def validation(run: Path) -> dict:
        found = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in found if "val_loss" in r)

    ddp, fsdp = validation(fsdp_runs["ddp"]), validation(fsdp_runs["fsdp"])
    assert ddp["step"] == fsdp["step"] == STEPS and math.isfinite(fsdp["val_loss"])
    # FSDP's loss runs at the sampling dtype (bf16 weights where bf16 is native), DDP's with fp32 weights.
    assert fsdp["val_loss"] == pytest.approx(ddp["val_loss"], rel=2e-2)
    grids = [np.asarray(Image.open(run / "samples" / f"step-{STEPS:08d}.png"), dtype=np.float32)
             for run in (fsdp_runs["ddp"], fsdp_runs["fsdp"])]
    assert grids[0].shape == grids[1].shape and np.abs(grids[0] - grids[1]).mean() < 4.0  # of 255


@pytest.mark.slow
@pytest.mark.parametrize("saved,mode", [("ddp", "fsdp"), ("fsdp", "ddp")])
def test_fsdp_checkpoint_resumes_across_modes(fsdp_runs, saved, mode):
    run = fsdp_runs[f"{saved}->{mode}"]
    checkpoint = fsdp_runs[saved] / f"step-{STEPS:08d}"
    # What the resumed run held right after loading is exactly what was saved, in every component.
    for name in ("model", "ema"):
        want = load_file(str(checkpoint / f"{name}.safetensors"))
        got = load_file(str(run / "loaded" / f"{name}.safetensors"))
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), name
    want = torch.load(checkpoint / "state.pt", weights_only=True)["optimizer"]
    got = torch.load(run / "loaded" / "optimizer.pt", weights_only=True)
    assert is_name_keyed(want) and is_name_keyed(got) and want["state"].keys() == got["state"].keys()
    for key, state in want["state"].items():
        assert all(torch.equal(state[s], got["state"][key][s]) for s in ("exp_avg", "exp_avg_sq", "step")), key
    resumed = losses(run)
    print(f"\n{saved} checkpoint resumed under {mode}: losses {resumed}")
    assert len(resumed) == MORE and all(math.isfinite(v) for v in resumed)
    assert (run / f"step-{STEPS + MORE:08d}").is_dir()


def test_fsdp_optimizer_state_is_name_keyed_and_reads_int_keyed():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))

    def adamw() -> torch.optim.AdamW:
        return torch.optim.AdamW([{"params": [model[0].weight, model[1].weight]},
                                  {"params": [model[0].bias, model[1].bias], "weight_decay": 0.0}])

    opt = adamw()
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    state = OptimizerState(model, opt).state_dict()
    assert state["param_groups"][0]["params"] == ["0.weight", "1.weight"] and set(state["state"]) == {
        "0.weight", "1.weight", "0.bias", "1.bias"}
    for source in (state, opt.state_dict()):  # ours, and torch's int-keyed one of checkpoints before it
        fresh = adamw()
        OptimizerState(model, fresh).load_state_dict(source)
        for p in model.parameters():
            assert torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
        assert fresh.param_groups[1]["weight_decay"] == 0.0


def test_fsdp_scalars_are_1d_and_old_checkpoints_load():
    time_embed, text = TimestepEmbedding(8), TextPartEmbedding(4, 8)
    assert time_embed.time_scale.shape == text.scale.shape == (1,)  # fully_shard refuses 0-dim parameters
    old = {**time_embed.state_dict(), "time_scale": torch.tensor(500.0)}  # () as saved before
    ModelState(time_embed).load_state_dict(old)
    assert time_embed.time_scale.tolist() == [500.0]
    ema = EMA(time_embed, 0.9)
    ema.load_state_dict({**old, "time_scale": torch.tensor(7.0)})
    assert ema.state_dict()["time_scale"].tolist() == [7.0]
    with pytest.raises(RuntimeError):  # a real shape mismatch still fails
        time_embed.load_state_dict({**old, "time_scale": torch.ones(2)})
