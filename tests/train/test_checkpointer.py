"""The Checkpointer (sd3/train/checkpointer.py): the save barrier, the loader's resume from meta.json, weights-only."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from sd3.config_loader import load_config
from sd3.data.index import BucketIndex
from sd3.data.sampler import BucketBatchSampler
from sd3.errors import CheckpointError
from sd3.train.checkpointer import Checkpointer, ResumePlan, data_start
from sd3.train.ema import EMA
from sd3.train.state import TrainState


def test_gpu_ready_loader_resume_reads_meta_json_only(tiny_checkpoint, shapes_phase, monkeypatch):
    def no_torch_load(*args, **kwargs):
        raise AssertionError("a loader rank opened state.pt")

    monkeypatch.setattr(torch, "load", no_torch_load)
    index = BucketIndex.load(shapes_phase.index_path)
    sampler = BucketBatchSampler(index, 2, 0, 0, 1, 0)  # the tiny run's loader: batch 2, one loader
    assert data_start(ResumePlan(tiny_checkpoint, exact=True, keep_wandb_id=True), sampler) == 4 == sampler.step
    assert data_start(ResumePlan(tiny_checkpoint, exact=False, keep_wandb_id=False), sampler) == 0  # reset_optim
    assert sampler.resumed == "exact"
    # Another layout (per-rank batch 2 -> 4) continues elastically; another seed cannot continue the stream.
    wider = BucketBatchSampler(index, 4, 0, 0, 1, 0)
    assert data_start(ResumePlan(tiny_checkpoint, exact=True, keep_wandb_id=True), wider) == 4
    assert wider.resumed == "elastic"
    with pytest.raises(CheckpointError, match="seed"):
        data_start(ResumePlan(tiny_checkpoint, exact=True, keep_wandb_id=True), BucketBatchSampler(index, 2, 9))


def components(tmp_path, step: int = 3):
    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    return {"model": model, "ema": EMA(model, 0.9), "optimizer": optimizer, "train": TrainState(step=step, run_id="r")}


def test_gpu_ready_model_ranks_wait_for_the_save_in_a_long_gloo_barrier(tmp_path, monkeypatch):
    cfg = load_config("tiny-cpu", [f"--train.save_dir={tmp_path}", "--train.save_timeout_minutes=45"])
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        checkpointer = Checkpointer(cfg, components(tmp_path), is_main=True, group=dist.group.WORLD)
        seen = []
        real = dist.monitored_barrier

        def spy(group=None, timeout=None, wait_all_ranks=False):
            seen.append((dist.get_backend(group), timeout, (tmp_path / "step-00000003" / "meta.json").is_file()))
            return real(group, timeout, wait_all_ranks)

        monkeypatch.setattr(dist, "monitored_barrier", spy)
        path = checkpointer.save()
        assert path == tmp_path / "step-00000003"
        # A gloo barrier (no NCCL watchdog) with the long deadline, entered once the checkpoint is on disk.
        assert seen == [("gloo", datetime.timedelta(minutes=45), True)]
    finally:
        dist.destroy_process_group()


def test_a_weights_only_checkpoint_starts_a_stage_but_never_resumes_exactly(tmp_path):
    from sd3.train.checkpoint import strip_to_weights

    cfg = load_config("tiny-cpu", [f"--train.save_dir={tmp_path}"])
    saved = components(tmp_path)
    path = Checkpointer(cfg, saved, is_main=True).save()
    strip_to_weights(path)
    fresh = components(tmp_path, step=0)
    with pytest.raises(ValueError, match="holds weights only"):
        Checkpointer(cfg, fresh, is_main=True).load(ResumePlan(path, exact=True, keep_wandb_id=True))
    Checkpointer(cfg, fresh, is_main=True).load(ResumePlan(path, exact=False, keep_wandb_id=False))
    assert torch.equal(fresh["model"].weight, saved["model"].weight) and fresh["train"].step == 0
