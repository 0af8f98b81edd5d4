"""mode=cached against mode=colocated: `sd3 cache` output replays the colocated run's batches exactly."""

from __future__ import annotations

import json

from fixtures.training import train_overrides

from sd3.commands.cache import build_cache
from sd3.commands.train import run
from sd3.config_loader import load_config
from sd3.data.cached import CacheReader


def test_cached_training_matches_colocated(tiny_models, shapes_phase, tmp_path):
    cache = tmp_path / "cache"
    extra = (f"--topology.cache_folder={cache}", "--train.total_steps=3", "--train.save_every=100")
    cfg = load_config("tiny-cpu", train_overrides(tiny_models, shapes_phase, tmp_path / "unused", *extra))
    assert build_cache(cfg, 1, 2) == 0
    reader = CacheReader(cache)
    assert reader.manifest["files"] == 2 and reader.manifest["rows_cached"] > 0

    for mode in ("colocated", "cached"):
        overrides = train_overrides(tiny_models, shapes_phase, tmp_path / mode, *extra, f"--topology.mode={mode}")
        cfg = load_config("tiny-cpu", overrides)
        assert run(cfg) == 0
    records = {mode: [json.loads(line) for line in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
               for mode in ("colocated", "cached")}
    colocated, cached = records["colocated"], records["cached"]
    # The cache holds the first 2 sampler steps: the same rows, captions and VAE samples -> the same losses.
    assert [r["loss"] for r in cached[:2]] == [r["loss"] for r in colocated[:2]]
    # Step 3's rows were never cached: they are skipped and counted, and training goes on.
    assert cached[2]["skipped_not_cached"] == 2 and cached[1]["skipped_not_cached"] == 0
