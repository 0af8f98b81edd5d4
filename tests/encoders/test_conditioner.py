"""Conditioner: RowLoader output -> the Batch a model rank consumes, with per-part timings."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sd3.config_loader import load_config
from sd3.data.batches import RawBatch, RowLoader
from sd3.data.index import BucketIndex
from sd3.data.sampler import BucketBatchSampler
from sd3.encoders.conditioner import PARTS, Conditioner
from sd3.encoders.hub import EncoderLoadError


@pytest.fixture(scope="module")
def conditioner(tiny_cfg) -> Conditioner:
    return Conditioner(tiny_cfg, "cpu")


def test_rowloader_batch_to_model_batch(conditioner, tiny_cfg, shapes_phase):
    index = BucketIndex.load(shapes_phase.index_path, shapes_phase.folder)
    sampler = BucketBatchSampler(index, global_batch=6, seed=0, loader_index=0, num_loaders=1, min_bucket_size=6)
    sampler_batch = sampler.batch(0)
    with RowLoader(shapes_phase.folder, tiny_cfg.data) as loader:
        raw = loader.load(sampler_batch)
    batch = conditioner(raw, torch.Generator().manual_seed(0))
    B, T, m = len(raw), tiny_cfg.model.text_tokens, tiny_cfg.model
    assert B == 6
    assert batch.latents.shape == (B, m.in_channels, sampler_batch.height // 8, sampler_batch.width // 8)
    assert batch.context.shape == (B, 2 * T, m.context_dim) and batch.pooled.shape == (B, m.pooled_dim)
    assert batch.row_ids.dtype == torch.int64 and batch.row_ids.tolist() == list(raw.row_ids)
    assert all(t.dtype == torch.float32 for t in (batch.latents, batch.context, batch.pooled))
    assert torch.isfinite(batch.latents).all() and batch.latents.abs().sum() > 0


def test_timings_accumulate_per_part(conditioner):
    raw = RawBatch(torch.zeros(3, 3, 32, 64), ["a red circle", "blue", "green star"], np.arange(3), {})
    before = dict(conditioner.timings)
    conditioner(raw)
    middle = dict(conditioner.timings)
    conditioner(raw)
    assert set(middle) == set(PARTS)
    for part in PARTS:
        assert conditioner.timings[part] > middle[part] > before[part] >= 0.0


def test_same_inputs_same_batch(conditioner):
    raw = RawBatch(torch.rand(2, 3, 32, 32) * 2 - 1, ["a red circle", "green star"], np.arange(2), {})
    a = conditioner(raw, torch.Generator().manual_seed(3))
    b = conditioner(raw, torch.Generator().manual_seed(3))
    for x, y in zip(a.tensors(), b.tensors(), strict=True):
        assert torch.equal(x, y)


def test_all_rows_skipped_gives_empty_batch(conditioner, tiny_cfg):
    raw = RawBatch(torch.empty(0, 3, 48, 64), [], np.zeros(0, dtype=np.int64), {"decode_error": 4})
    batch = conditioner(raw)
    assert len(batch) == 0 and batch.latents.shape == (0, 16, 6, 8)
    assert batch.context.shape == (0, 2 * tiny_cfg.model.text_tokens, tiny_cfg.model.context_dim)


def test_batch_dtype_setting(tiny_models):
    cfg = load_config("tiny-cpu", tiny_models.overrides + ["--encoders.batch_dtype=bf16"])
    raw = RawBatch(torch.zeros(1, 3, 16, 16), ["red"], np.arange(1), {})
    batch = Conditioner(cfg, "cpu")(raw)
    assert batch.latents.dtype == batch.context.dtype == batch.pooled.dtype == torch.bfloat16


def test_model_dims_must_match_encoders(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, text_dims=[2304, 1024]))
    with pytest.raises(EncoderLoadError, match=r"model\.text_dims"):
        Conditioner(cfg, "cpu")


def test_peak_memory_is_reported(conditioner):
    """On CPU the stat is the process's peak RSS: at least the memory the encoders' weights hold."""
    raw = RawBatch(torch.zeros(2, 3, 32, 32), ["red", "blue star"], np.arange(2), {})
    conditioner(raw)
    weights = sum(p.numel() * p.element_size() for m in (conditioner.text.gemma, conditioner.vae.vae)
                  for p in m.parameters())
    assert conditioner.memory_source == "cpu_max_rss" and conditioner.peak_memory_bytes > weights
