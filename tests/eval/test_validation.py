"""The Validator with the tiny model and tiny encoders: a short training run that writes grids and a held-out loss
curve, the grid against the sampling pipeline, and the fixed rows / noise / timesteps that make curves comparable."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from fixtures.training import VALIDATION_PROMPTS as PROMPTS
from fixtures.training import train_overrides, validation_overrides
from PIL import Image
from scipy.special import expit
from scipy.stats import norm

from sd3.commands.train import run
from sd3.config_loader import apply_override, config_from_dict, load_config
from sd3.eval.validation import Validator, loss_timesteps
from sd3.sample.pipeline import Pipeline
from sd3.train.checkpoint import load_checkpoint
from sd3.train.ema import EMA
from sd3.train.trainer import Trainer

CPU = torch.device("cpu")


def test_loss_timesteps_are_the_probability_midpoints_of_the_logit_normal():
    t = loss_timesteps(8, 1.0, 1.4)
    expected = expit(1.0 + 1.4 * norm.ppf((np.arange(8) + 0.5) / 8))
    np.testing.assert_allclose(t.numpy(), expected, rtol=1e-6)
    assert torch.all(t[1:] > t[:-1])
    symmetric = loss_timesteps(8, 0.0, 1.0)  # N(0, 1): t and 1 - t are equally likely
    np.testing.assert_allclose((symmetric + symmetric.flip(0)).numpy(), 1.0, atol=1e-6)


def test_short_run_writes_grids_and_a_heldout_loss_curve(tmp_path, tiny_models, shapes_phase):
    """4 colocated steps through `sd3 train`'s own path: it builds the Validator on model rank 0 and Trainer.train()
    calls it after each report; validating at 2 and 4 (every 2, and the last step)."""
    cfg = load_config("tiny-cpu", train_overrides(
        tiny_models, shapes_phase, tmp_path, "--topology.mode=colocated", "--train.total_steps=4",
        "--train.save_every=100", "--train.grad_norms_every=2", *validation_overrides(shapes_phase, every=2),
    ))
    logged = {}
    validators = []

    def inspect(trainer: Trainer) -> None:
        validators.append(trainer.validator)

    real_maybe_run = Validator.maybe_run

    def recording(self, step, *args, **kwargs):  # the real call, its result kept for the asserts
        out = real_maybe_run(self, step, *args, **kwargs)
        if out is not None:
            logged[step] = out
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Validator, "maybe_run", recording)
        assert run(cfg, after_train=inspect) == 0
    assert isinstance(validators[0], Validator) and validators[0].rows == 6

    assert sorted(logged) == [2, 4]
    for step in (2, 4):
        grid = tmp_path / "samples" / f"step-{step:08d}.png"
        assert logged[step]["val_grid"] == str(grid)
        with Image.open(grid) as image:
            assert image.width >= 2 * 128 and image.height > 128  # 2 cells of >= 128 px, captions under them
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in curve] == [2, 4]
    # After the step's report (Trainer.train: report, validate, save).
    steps_logged = [r["step"] for r in records if "loss" in r or "val_loss" in r]
    assert steps_logged == [1, 2, 2, 3, 4, 4]
    for r in curve:
        buckets = [r[f"val_loss_t{k}"] for k in range(8)]
        assert all(np.isfinite(buckets)) and r["val_loss"] == pytest.approx(np.mean(buckets))
        assert 0 < r["val_time_pct"] <= 100 and r["val_seconds"] > 0
    # Near t = 1 the input is almost pure noise: the velocity (noise - x0) is hardest to predict there.
    assert curve[0]["val_loss_t7"] != curve[0]["val_loss_t0"]
    assert curve[0]["val_loss"] != curve[1]["val_loss"]  # training moved the weights between the two
    # train.grad_norms_every=2: per-block gradient and weight norms in the step reports of steps 2 and 4 only.
    for r in (r for r in records if "loss" in r):
        norms = {k: v for k, v in r.items() if k.startswith(("grad_norm/", "weight_norm/"))}
        if r["step"] % 2:
            assert not norms, r["step"]
        else:
            assert {"grad_norm/blocks.0", "weight_norm/blocks.3", "grad_norm/head"} <= norms.keys(), sorted(norms)
            assert all(np.isfinite(v) and v >= 0 for v in norms.values()) and norms["grad_norm/head"] > 0
            # Step 1 ran at lr 0 (warm-up), so at step 2 the zero-initialised head still blocks every other gradient.
            assert (norms["grad_norm/blocks.0"] > 0) == (r["step"] == 4)


def test_heldout_loss_is_fixed_across_validators_and_follows_the_weights(tiny_checkpoint, shapes_phase):
    cfg = config_from_dict(json.loads((tiny_checkpoint / "config.json").read_text()))
    for item in validation_overrides(shapes_phase):
        apply_override(cfg, item)
    loaded = load_checkpoint(tiny_checkpoint)
    model = Pipeline.from_checkpoint(tiny_checkpoint, device="cpu", dtype="fp32", use_ema=False).model
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = Validator(cfg, CPU)
        assert torch.get_num_threads() == 2  # not the loaders' encoders.cpu_threads (1 in tiny-cpu)
        b = Validator(cfg, CPU)  # a resumed run builds its Validator anew
        first = a.heldout_loss(model, contextlib.nullcontext)
        assert b.heldout_loss(model, contextlib.nullcontext) == first  # same rows, noise and t: the same numbers
        with torch.no_grad():
            model.head.bias.add_(0.5)  # a different model scores differently
        assert a.heldout_loss(model, contextlib.nullcontext)["val_loss"] != first["val_loss"]
    finally:
        torch.set_num_threads(before)
    assert loaded.meta["step"] == 4


def test_grid_images_are_the_pipelines_images_with_the_ema_weights(tiny_checkpoint, shapes_phase, tmp_path):
    """Image k of the grid == Pipeline(prompt k, seed + k) from the checkpoint's EMA weights with [sample] settings."""
    cfg = config_from_dict(json.loads((tiny_checkpoint / "config.json").read_text()))
    for item in [*validation_overrides(shapes_phase), "--validation.parquet_folder=", f"--train.save_dir={tmp_path}",
                 "--validation.seed=7"]:
        apply_override(cfg, item)
    validator = Validator(cfg, CPU)
    assert validator.heldout == []  # no held-out folder: the grid alone
    model = Pipeline.from_checkpoint(tiny_checkpoint, device="cpu", dtype="fp32", use_ema=False).model
    ema = EMA(model, 0.9)
    ema.load_state_dict(load_checkpoint(tiny_checkpoint).ema_state)
    images = validator.sample_images(ema)

    pipe = Pipeline.from_checkpoint(tiny_checkpoint, device="cpu", dtype="bf16")  # EMA weights, bf16 as training's
    s = cfg.sample
    expected = pipe(PROMPTS, seed=7, sampler="euler", num_steps=s.num_steps, cfg_scale=s.cfg_scale, width=32,
                    height=32).images  # image k from seed 7 + k, both prompts in one forward as the Validator's
    for k in range(len(PROMPTS)):
        assert np.array_equal(np.asarray(images[k]), np.asarray(expected[k])), f"prompt {k} differs"
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    path = validator.grid(ema, 12)
    assert path == tmp_path / "samples" / "step-00000012.png" and path.is_file()
