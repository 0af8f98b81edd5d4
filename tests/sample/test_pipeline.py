"""The sampling pipeline against `tiny_checkpoint` (a short real training run): sizes, samplers, seeds, CFG, the size
error, EMA vs raw weights, timestep shift and image-to-image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sd3.errors import ConfigError
from sd3.sample.checks import check_size
from sd3.sample.pipeline import Pipeline
from sd3.sample.samplers import SAMPLERS, euler, make_timesteps

SIZE = dict(width=48, height=32, num_steps=3)  # non-square, so a swapped width/height would show


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint) -> Pipeline:
    return Pipeline.from_checkpoint(tiny_checkpoint, device="cpu", dtype="bf16", keep_vae_encoder=True)


def circle_image(width: int = 48, height: int = 32) -> Image.Image:
    """A shapes-style init image: a red disc on white."""
    image = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(image).ellipse((8, 4, 32, 28), fill=(220, 30, 30))
    return image


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
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
    with pytest.raises(ConfigError, match=f"{culprit} is not a positive multiple of 16"):
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


def _conditional_euler(pipe: Pipeline, prompt: str, seed: int, timesteps: torch.Tensor, x: torch.Tensor | None = None):
    """A hand-written conditional Euler loop (cfg 0) over the pipeline's model, from x (default: the seed's noise)."""
    context, pooled = pipe.encode([prompt])  # (1, 2T, D), (1, P)
    if x is None:
        x = torch.randn(1, pipe.cfg.model.in_channels, 32 // 8, 48 // 8, generator=torch.Generator().manual_seed(seed))

    def conditional(x, t):
        with torch.autocast("cpu", torch.bfloat16):
            return pipe.model(x.to(torch.bfloat16), t.float(), context, pooled).float()

    with torch.inference_mode():
        return pipe.decode(euler(conditional, x, timesteps))[0]


def test_shift_one_is_the_unshifted_grid_and_shift_three_is_sd3s(pipe):
    base = dict(cfg_scale=0.0, seed=4, sampler="euler", **SIZE)
    default = pipe("a blue square", **base)
    assert default.settings["shift"] == 1.0
    assert np.array_equal(pixels(pipe("a blue square", shift=1.0, **base).images[0]), pixels(default.images[0]))
    shifted = pipe("a blue square", shift=3.0, **base)
    assert shifted.settings["shift"] == 3.0
    by_hand = _conditional_euler(pipe, "a blue square", 4, make_timesteps(SIZE["num_steps"], shift=3.0))
    assert np.array_equal(pixels(shifted.images[0]), pixels(by_hand))
    unshifted = _conditional_euler(pipe, "a blue square", 4, make_timesteps(SIZE["num_steps"]))
    assert np.array_equal(pixels(default.images[0]), pixels(unshifted))
    with pytest.raises(ConfigError, match="shift 0.0 must be > 0"):
        pipe("a blue square", shift=0.0, **SIZE)


def test_strength_zero_returns_the_init_images_reconstruction(pipe):
    image = circle_image()
    result = pipe("a red circle", init_image=image, strength=0.0, seed=2, batch_size=2, return_intermediates=True,
                  **SIZE)
    latents = pipe.encode_image(image, 48, 32)  # (1, C, 4, 6)
    reconstruction = pipe.decode(latents.expand(2, -1, -1, -1))[0]  # decoded as a batch of 2, like the call's
    assert result.settings["steps_taken"] == 0
    for out in result.images:
        assert np.array_equal(pixels(out), pixels(reconstruction))
    assert [len(f) for f in result.intermediates] == [1, 1]  # no step: the final image alone
    # The tiny VAE really reconstructs the shapes images: the disc stays red, the background white.
    rgb = pixels(reconstruction)
    assert rgb[16, 20, 0] > 150 > rgb[16, 20, 1] and rgb[2, 44].min() > 150


def test_strength_one_is_text_to_image_and_between_is_neither(pipe):
    image = circle_image()
    base = dict(cfg_scale=0.0, seed=6, sampler="euler", width=48, height=32, num_steps=4)
    txt2img = pipe("a green triangle", **base)
    full = pipe("a green triangle", init_image=image, strength=1.0, **base)
    # x_1 = the same seeded noise. (Up to 1-2 levels of 8 bits: oneDNN's bf16 kernels may differ once the VAE
    # encoder has run in between.)
    assert np.abs(pixels(full.images[0]) - pixels(txt2img.images[0])).max() <= 2
    half = pipe("a green triangle", init_image=image, strength=0.5, **base)
    assert half.settings["steps_taken"] == 2  # the full run's grid entered at t = 0.5: steps 0.5 -> 0.25 -> 0
    # By hand: noise the image's latents to t = 0.5 with the seed's noise, then Euler on [0.5, 0.25, 0].
    init = pipe.encode_image(image, 48, 32)  # (1, C, 4, 6)
    noise = torch.randn(init.shape, generator=torch.Generator().manual_seed(6))
    x = 0.5 * init + 0.5 * noise
    by_hand = _conditional_euler(pipe, "a green triangle", 6, torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64), x)
    assert np.abs(pixels(half.images[0]) - pixels(by_hand)).max() <= 2
    assert not np.array_equal(pixels(half.images[0]), pixels(txt2img.images[0]))


def test_init_image_sets_the_size_and_needs_the_vae_encoder(pipe, tiny_checkpoint, tmp_path):
    path = tmp_path / "init.png"
    circle_image(50, 37).save(path)  # not on the 16-pixel grid: rounded down to 48 x 32
    result = pipe("a red circle", init_image=path, strength=0.6, seed=1, num_steps=2)
    assert result.images[0].size == (48, 32) and result.settings["init_image"] == str(path)
    with pytest.raises(ConfigError, match="strength 1.5 must be in"):
        pipe("a red circle", init_image=path, strength=1.5, num_steps=2)
    decoder_only = Pipeline.from_checkpoint(tiny_checkpoint, device="cpu", dtype="bf16")
    with pytest.raises(ValueError, match="keep_vae_encoder=True"):
        decoder_only("a red circle", init_image=path, num_steps=2)


def test_weights_with_the_older_0_dim_scalars_load(tmp_path):
    """Checkpoints written before the scalar parameters became (1,) (FSDP refuses 0-dim ones) still sample."""
    from safetensors.torch import save_file

    from sd3.config_loader import load_config
    from sd3.model import build_model
    from sd3.sample.pipeline import load_weights

    model = build_model(load_config("tiny-cpu").model)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    old["time_embed.time_scale"] = torch.tensor(321.0)  # shape (), as such checkpoints hold it
    save_file(old, str(tmp_path / "ema.safetensors"))
    load_weights(model, tmp_path / "ema.safetensors")
    assert model.time_embed.time_scale.tolist() == [321.0]
    old["time_embed.time_scale"] = torch.ones(2)  # a real mismatch is still refused, naming the key
    save_file(old, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="time_embed.time_scale"):
        load_weights(model, tmp_path / "bad.safetensors")
