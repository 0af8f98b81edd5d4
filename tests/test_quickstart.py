"""The quick start's parts: the colour classifier of `sd3 bench learn`, and a tiny end-to-end `sd3 quickstart`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from sd3.bench.learn import derangement, heldout
from sd3.sample.colour import classify


def test_colour_classifier_reads_rendered_shapes():
    samples = heldout(60, seed=7, max_res=64)
    found = [classify(s.image) for s in samples]
    assert [f.shape for f in found] == [s.labels.colour for s in samples]
    assert [f.background for f in found] == [s.labels.background for s in samples]


def test_colour_classifier_without_a_shape():
    plain = classify(Image.new("RGB", (32, 32), (40, 80, 220)))
    assert plain.background == "blue" and plain.shape is None


def test_derangement_moves_every_caption():
    import torch

    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 17):
        perm = derangement(n, g).tolist()
        assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))


@pytest.mark.slow
def test_quickstart_tiny_run_then_resume(tmp_path):
    """A few steps from nothing to the grid; a second run skips every stage and still prints the grid."""
    cmd = [sys.executable, "-m", "sd3", "quickstart", "--root", str(tmp_path), "--steps", "4", "--n-images", "120",
           "--vae-steps", "20", "--sample-steps", "2", "--prompt", "a red circle", "--prompt", "a blue square",
           "--set", "train.precision=fp32"]  # what a CPU without native bf16 runs
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    grid = tmp_path / "runs" / "quickstart" / "quickstart_grid.png"
    assert first.stdout.strip().splitlines()[-1] == str(grid)
    assert Image.open(grid).size[0] > 128
    trained = json.loads((tmp_path / "runs" / "quickstart" / "step-00000004" / "config.json").read_text())
    assert trained["train"]["precision"] == "fp32"  # --set reached the training run
    # Hybrid mode: the loader read the posteriors stage 5 cached, one file per training shard.
    assert trained["topology"]["mode"] == "hybrid"
    latents = tmp_path / "data" / "quickstart" / "latents"
    assert trained["data"]["latent_cache"] == str(latents) and list(latents.glob("*.safetensors"))

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done already") == 6  # stages 1-6 skipped, only the grid is sampled again
    assert second.stdout.strip().splitlines()[-1] == str(grid)

    # Other tiny models than the checkpoint was trained with (as after an upgrade): no silent resume.
    marker = tmp_path / "data" / "tiny-models" / ".complete"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "vae": "older weights"}))
    third = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert third.returncode == 2
    assert "holds a checkpoint (step 4) made before make-tiny was redone" in third.stderr
