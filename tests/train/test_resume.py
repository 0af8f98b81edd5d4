"""Exact resume: 20 steps in one go versus 10 steps, stop, resume, 10 more — bit for bit on CPU; and a stage
started with train.init_from, which a save_dir with a checkpoint of its own ignores (resumes its own instead)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fixtures.training import logged_losses as losses
from fixtures.training import straight_and_resumed, train_overrides

from sd3.commands.train import run
from sd3.config_loader import load_config
from sd3.errors import CheckpointError
from sd3.train.checkpoint import load_checkpoint
from sd3.train.checkpointer import Checkpointer, ResumePlan, plan_resume


def assert_same_tree(a, b, where: str = "") -> None:
    """Recursively torch.equal tensors and == everything else (optimizer / scheduler state)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {where}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{a!r} != {b!r} at {where}"


def test_resume_replays_the_uninterrupted_run(tiny_models, shapes_phase, tmp_path):
    common = ("--topology.mode=colocated", "--train.deterministic=true", "--train.save_every=10",
              "--train.ema_update_every=3", "--train.reset_optim=true", "--train.reset_wandb=true")
    # resume=auto continues the run exactly even though reset_optim / reset_wandb are set (they apply to PATH).
    a, b = straight_and_resumed(tiny_models, shapes_phase, tmp_path, common, total=20, stop=10)
    straight, split = tmp_path / "straight", tmp_path / "split"  # where it ran them
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert [a[s] for s in range(1, 21)] == [b[s] for s in range(1, 21)]

    one = load_checkpoint(straight / "step-00000020", map_location="cpu")
    two = load_checkpoint(split / "step-00000020", map_location="cpu")
    assert_same_tree(one.model_state, two.model_state, "model")
    assert_same_tree(one.ema_state, two.ema_state, "ema")
    assert_same_tree(one.train_state["optimizer"], two.train_state["optimizer"], "optimizer")
    assert_same_tree(one.train_state["scheduler"], two.train_state["scheduler"], "scheduler")
    assert one.train_state["train"]["sampler"] == two.train_state["train"]["sampler"]
    assert two.train_state["train"]["sampler"]["step"] == 20
    assert one.meta["wandb_run_id"] != two.meta["wandb_run_id"]  # separate runs ...
    first_half = load_checkpoint(split / "step-00000010", map_location="cpu")
    assert first_half.meta["wandb_run_id"] == two.meta["wandb_run_id"]  # ... but the resumed one kept its id


def test_reset_optim_keeps_weights_and_starts_a_new_stage(tiny_checkpoint, tiny_models, shapes_phase, tmp_path):
    """resume=PATH with reset_optim: weights and EMA from the checkpoint, fresh optimizer, step 0, larger max_res."""
    cfg = load_config("tiny-cpu", train_overrides(
        tiny_models, shapes_phase, tmp_path, "--topology.mode=colocated", f"--train.resume={tiny_checkpoint}",
        "--train.reset_optim=true", "--train.reset_wandb=true", "--train.total_steps=1", "--model.max_res=128",
    ))
    seen = {}
    assert run(cfg, after_train=lambda t: seen.update(step=t.state.step, micro_step=t.state.micro_step)) == 0
    assert seen["step"] == 1 and seen["micro_step"] == 1  # the data starts again from sampler step 0
    new = load_checkpoint(tmp_path / "step-00000001", map_location="cpu")
    old = load_checkpoint(tiny_checkpoint, map_location="cpu")
    assert new.meta["wandb_run_id"] != old.meta["wandb_run_id"]
    assert len(new.train_state["optimizer"]["state"]) > 0
    steps = {v["step"] for v in new.train_state["optimizer"]["state"].values()}
    assert {float(s) for s in steps} == {1.0}  # one AdamW step since the reset, not 4 + 1


def test_kill_during_checkpoint_write_falls_back_to_the_previous_one(tiny_models, shapes_phase, tmp_path):
    import subprocess
    import sys

    worker = Path(__file__).parent / "workers" / "crash_in_save.py"
    args = train_overrides(tiny_models, shapes_phase, tmp_path, "--topology.mode=colocated", "--train.total_steps=4",
                           "--train.save_every=2")
    proc = subprocess.run([sys.executable, str(worker), "tiny-cpu", *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed while writing the step-4 checkpoint
    assert not (tmp_path / "step-00000004").exists()

    from sd3.train.checkpoint import resolve_checkpoint

    assert resolve_checkpoint(tmp_path) == tmp_path / "step-00000002"
    assert load_checkpoint(tmp_path / "step-00000002", map_location="cpu").train_state["train"]["step"] == 2
    # And the run continues from it.
    steps = {}
    assert run(load_config("tiny-cpu", [*args, "--train.resume=auto"]),
               after_train=lambda t: steps.update(step=t.state.step)) == 0
    assert steps["step"] == 4 and resolve_checkpoint(tmp_path) == tmp_path / "step-00000004"


def stage_overrides(tiny_models, shapes_phase, save_dir: Path, init_from: Path, *extra: str) -> list[str]:
    """A stage-2 run as runjob_SLURM.sh starts it: resume=auto plus init_from, deterministic so two runs compare."""
    return train_overrides(tiny_models, shapes_phase, save_dir, "--topology.mode=colocated", "--train.resume=auto",
                           f"--train.init_from={init_from}", "--train.deterministic=true", "--train.save_every=2",
                           *extra)


def test_init_from_starts_a_stage_once_then_the_save_dir_resumes_its_own(tiny_checkpoint, tiny_models, shapes_phase,
                                                                         tmp_path, capsys, monkeypatch):
    """resume=auto + init_from: a fresh save_dir starts from init_from (weights + EMA, step 0); once it has a checkpoint
    of its own, the same command line resumes that one exactly (a requeue), never init_from again."""
    stage_one = tiny_checkpoint.parent  # a save_dir: its latest checkpoint (step 4) is taken
    old = load_checkpoint(tiny_checkpoint, map_location="cpu")
    loaded = {}
    original_load = Checkpointer.load

    def recording_load(self, plan):  # the weights the Trainer starts from, right after the checkpoint is applied
        original_load(self, plan)
        loaded["model"] = {k: v.detach().clone() for k, v in self.components["model"].state_dict().items()}
        loaded["step"] = self.train_state.step

    monkeypatch.setattr(Checkpointer, "load", recording_load)

    # First run of the stage job: its save_dir is empty, so it starts from init_from as a new stage.
    split = tmp_path / "split"
    cfg = load_config("tiny-cpu", stage_overrides(tiny_models, shapes_phase, split, stage_one, "--train.total_steps=2"))
    assert plan_resume(cfg) == ResumePlan(tiny_checkpoint, exact=False, keep_wandb_id=False)
    assert run(cfg) == 0
    assert f"resuming from {tiny_checkpoint}, weights and EMA only (reset_optim): new stage from step 0" in (
        capsys.readouterr().out)
    assert loaded["step"] == 0
    assert_same_tree(loaded["model"], old.model_state, "model after init_from")
    first = load_checkpoint(split / "step-00000002", map_location="cpu")
    assert {float(v["step"]) for v in first.train_state["optimizer"]["state"].values()} == {2.0}  # not 4 + 2
    assert first.meta["wandb_run_id"] != old.meta["wandb_run_id"]  # reset_wandb applies to init_from

    # The requeued job: same arguments (init_from still given), but the save_dir now has step 2 of its own.
    cfg = load_config("tiny-cpu", stage_overrides(tiny_models, shapes_phase, split, stage_one, "--train.total_steps=4"))
    assert plan_resume(cfg) == ResumePlan(split / "step-00000002", exact=True, keep_wandb_id=True)
    assert run(cfg) == 0
    assert f"resuming from {split / 'step-00000002'}, continuing exactly" in capsys.readouterr().out
    assert loaded["step"] == 2
    assert_same_tree(loaded["model"], first.model_state, "model after the requeue")

    # "Exactly": the stage run without the interruption gives the same losses and the same step-4 state.
    straight = tmp_path / "straight"
    assert run(load_config("tiny-cpu", stage_overrides(tiny_models, shapes_phase, straight, stage_one,
                                                       "--train.total_steps=4"))) == 0
    a, b = losses(straight), losses(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and [a[s] for s in a] == [b[s] for s in a]
    one = load_checkpoint(straight / "step-00000004", map_location="cpu")
    two = load_checkpoint(split / "step-00000004", map_location="cpu")
    assert_same_tree(one.model_state, two.model_state, "model")
    assert_same_tree(one.ema_state, two.ema_state, "ema")
    assert_same_tree(one.train_state["optimizer"], two.train_state["optimizer"], "optimizer")
    assert two.meta["wandb_run_id"] == first.meta["wandb_run_id"]  # the requeued run kept the stage's wandb run


def test_resume_path_together_with_init_from_is_refused(tiny_checkpoint, tiny_models, shapes_phase, tmp_path):
    cfg = load_config("tiny-cpu", train_overrides(tiny_models, shapes_phase, tmp_path,
                                                  f"--train.resume={tiny_checkpoint}",
                                                  f"--train.init_from={tiny_checkpoint.parent}"))
    with pytest.raises(CheckpointError, match=r"train\.resume=.*and train\.init_from=.*: give one"):
        plan_resume(cfg)
