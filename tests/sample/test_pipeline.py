"""The sampling pipeline against `tiny_checkpoint` (a short real training run): sizes, samplers, seeds, CFG, the size
error, EMA vs raw weights, and `sd3 sample` end to end."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from sd3.sample.pipeline import Pipeline, check_size
from sd3.sample.samplers import euler, make_timesteps

SIZE = dict(width=48, height=32, num_steps=3)  # non-square, so a swapped width/height would show


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint) -> Pipeline:
    return Pipeline.from_checkpoint(tiny_checkpoint, device="cpu", dtype="bf16")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("sampler", ["euler", "euler_stochastic", "heun"])
def test_each_sampler_makes_images_of_the_requested_size(pipe, sampler):
    result = pipe(["a red circle", "a blue square"], sampler=sampler, batch_size=2, seed=3, cfg_scale=2.0, **SIZE)
    assert len(result.images) == 4
    assert all(im.size == (48, 32) and im.mode == "RGB" for im in result.images)
    assert result.seeds == [3, 4, 5, 6]
    assert result.prompts == ["a red circle"] * 2 + ["a blue square"] * 2
    # Different noise seeds give different images (the decoded output is not a constant).
    assert np.abs(pixels(result.images[0]) - pixels(result.images[1])).max() > 0


def test_same_seed_same_image_and_random_seed_is_reported(pipe):
    a = pipe("a green triangle", sampler="euler_stochastic", seed=11, cfg_scale=3.0, **SIZE)
    b = pipe("a green triangle", sampler="euler_stochastic", seed=11, cfg_scale=3.0, **SIZE)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    other = pipe("a green triangle", sampler="euler_stochastic", seed=12, cfg_scale=3.0, **SIZE)
    assert not np.array_equal(pixels(a.images[0]), pixels(other.images[0]))

    drawn = pipe("a green triangle", seed=-1, **SIZE)
    assert drawn.seeds[0] >= 0
    again = pipe("a green triangle", seed=drawn.seeds[0], **SIZE)
    assert np.array_equal(pixels(drawn.images[0]), pixels(again.images[0]))


def test_cfg_scale_zero_is_the_conditional_only_path(pipe):
    """cfg 0 through the pipeline == a hand-written conditional Euler loop over the same model and noise."""
    seed, prompt = 5, "a yellow star at the bottom"
    via_pipeline = pipe(prompt, cfg_scale=0.0, seed=seed, sampler="euler", **SIZE)

    context, pooled = pipe.encode([prompt])  # (1, 2T, D), (1, P)
    noise = torch.randn(1, pipe.cfg.model.in_channels, 32 // 8, 48 // 8, generator=torch.Generator().manual_seed(seed))

    def conditional(x, t):
        with torch.autocast("cpu", torch.bfloat16):
            return pipe.model(x.to(torch.bfloat16), t.float(), context, pooled).float()

    with torch.inference_mode():
        latents = euler(conditional, noise, make_timesteps(SIZE["num_steps"]))
    by_hand = pipe.decode(latents)[0]
    assert np.array_equal(pixels(via_pipeline.images[0]), pixels(by_hand))

    # And guidance has something to amplify: the model's velocity depends on the prompt. (Compared before the
    # VAE: after 4 training steps, mostly averaged away by the EMA, the difference can vanish in 8-bit pixels.)
    x, t = noise.to(torch.bfloat16), torch.full((1,), 0.5)
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
        v_cond = pipe.model(x, t, context, pooled).float()
        v_uncond = pipe.model(x, t, torch.zeros_like(context), torch.zeros_like(pooled)).float()
    assert (v_cond - v_uncond).abs().max() > 0


@pytest.mark.parametrize("width,height,culprit", [(50, 32, "width 50"), (48, 20, "height 20"), (0, 32, "width 0")])
def test_sizes_not_multiple_of_16_are_refused(pipe, width, height, culprit):
    with pytest.raises(ValueError, match=f"{culprit} is not a positive multiple of 16"):
        pipe("a red circle", width=width, height=height, num_steps=1)


def test_above_trained_resolution_warns():
    with pytest.warns(UserWarning, match="above the resolution this checkpoint was trained at"):
        check_size(128, 64, max_res=64)


def test_intermediates_one_frame_per_step(pipe):
    result = pipe("a red circle", return_intermediates=True, batch_size=2, seed=1, **SIZE)
    assert len(result.intermediates) == 2
    assert all(len(frames) == SIZE["num_steps"] + 1 for frames in result.intermediates)  # steps + final image
    assert np.array_equal(pixels(result.intermediates[1][-1]), pixels(result.images[1]))


def test_raw_weights_differ_from_ema(tiny_checkpoint, pipe):
    raw = Pipeline.from_checkpoint(tiny_checkpoint, device="cpu", dtype="bf16", use_ema=False)
    ema_params = dict(pipe.model.named_parameters())
    assert any(not torch.equal(p, ema_params[name]) for name, p in raw.model.named_parameters())


def test_sample_command_writes_pngs_grid_and_gif(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sd3", "sample", "--checkpoint", str(tiny_checkpoint), "--prompt", "a red circle",
           "--prompt", "a blue square!", "--out", str(out), "--steps", "2", "--width", "32", "--height", "32",
           "--seed", "7", "--gif", "--device", "cpu"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["7_a-red-circle.gif", "7_a-red-circle.png", "8_a-blue-square.gif", "8_a-blue-square.png",
                     "grid_7.png"]
    assert str(out / "grid_7.png") in run.stdout

    bad_cmd = [a if a != "32" else "30" for a in cmd]  # width 30 and height 30: width is named first
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "width 30 is not a positive multiple of 16" in bad.stderr
