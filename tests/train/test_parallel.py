"""parallelize (sd3/train/parallel.py) and the optimizer it trains with: DDP memory settings, fused AdamW on CUDA."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sd3.config import TrainConfig
from sd3.train.parallel import ModelRanks, parallelize
from sd3.train.step import build_optimizer


def test_gpu_ready_ddp_uses_bucket_views_and_the_configured_bucket_size(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = torch.nn.Linear(8, 8)
        ranks = ModelRanks(torch.device("cpu"), dist.group.WORLD, 0, 2)  # "2": take the DDP path in one process
        ddp = parallelize(model, TrainConfig(bucket_cap_mb=7), ranks)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        assert ddp.gradient_as_bucket_view and ddp.bucket_bytes_cap == 7 * 1024 * 1024
        ddp(torch.randn(2, 8)).sum().backward()
        # The gradient is a view into DDP's bucket: no second copy of the gradients exists.
        assert model.weight.grad.untyped_storage().nbytes() > model.weight.grad.numel() * 4
        assert parallelize(model, TrainConfig(), ModelRanks(torch.device("cpu"))) is model  # alone: no DDP
    finally:
        dist.destroy_process_group()


def test_gpu_ready_adamw_is_fused_on_cuda_and_foreach_elsewhere():
    model = torch.nn.Linear(4, 4)
    cuda = build_optimizer(model, TrainConfig(), torch.device("cuda"))
    cpu = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    assert all(g["fused"] for g in cuda.param_groups) and not any(g["foreach"] for g in cuda.param_groups)
    assert all(g["foreach"] for g in cpu.param_groups) and not any(g["fused"] for g in cpu.param_groups)
