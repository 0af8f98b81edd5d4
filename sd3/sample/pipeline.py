"""Prompt -> image: a checkpoint's MMDiT, its text encoders and VAE decoder, loaded once, sampled many times.

The source (003_5bc3fb5fdb7c8fe6.txt, "Inference") kept every model on the GPU in fp32 and needed ~15 GB at 512².
Here the weights are created in the sampling dtype (no fp32 copy), and each stage's models visit the device alone
(when it is not the CPU): the text encoders encode every prompt of a call while the MMDiT waits on the CPU, then the
MMDiT denoises with the encoders back on the CPU, then the VAE decoder decodes. The device's peak is the largest
stage, not the sum of all models.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

from sd3.config import Config
from sd3.devices import resolve_device, resolve_dtype
from sd3.encoders.text import TextEncoders
from sd3.encoders.vae import LatentVAE, normalize
from sd3.errors import ConfigError
from sd3.model import MMDiT, build_model
from sd3.model.layers import fit_scalar
from sd3.sample.checks import SIZE_MULTIPLE, Settings, check_settings, check_size, open_checkpoint, open_image
from sd3.sample.images import to_pil, to_tensor
from sd3.sample.offload import Offload
from sd3.sample.samplers import SAMPLERS, enter_timesteps, guided, make_timesteps


def build_in_dtype(cfg: Config, device: torch.device, dtype: torch.dtype) -> MMDiT:
    """The MMDiT with its parameters created directly in `dtype` on `device`: no fp32 copy ever exists, which for
    the 1.2B model saves 4.8 GB of peak memory. Buffers the model builds in explicit fp32 stay fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model(cfg.model)
    finally:
        torch.set_default_dtype(previous)
    return model.requires_grad_(False).eval()


def load_weights(model: MMDiT, path: Path) -> None:
    """Copy a safetensors state dict into `model` one tensor at a time (cast to the model's dtype), so the peak is
    the model plus one tensor rather than the model plus a full fp32 state dict. Keys must match exactly."""
    own = model.state_dict()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(own.keys() - keys), sorted(keys - own.keys())
        if missing or unexpected:
            raise ConfigError(f"{path}: weights do not fit the model of its config.json: "
                           f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        with torch.no_grad():
            for key in keys:
                tensor = fit_scalar(f.get_tensor(key), own[key].shape)  # () scalars of older checkpoints
                if tensor.shape != own[key].shape:
                    raise ConfigError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(own[key].shape)}")
                own[key].copy_(tensor)


@dataclass
class SampleResult:
    """What one call returns. `intermediates[i]` are image i's frames, one per step (when requested)."""

    images: list[Image.Image]
    seeds: list[int]  # image i was drawn from noise seeded with seeds[i]
    prompts: list[str]  # prompts[i] is image i's prompt
    intermediates: list[list[Image.Image]] | None = None
    settings: dict = field(default_factory=dict)  # sampler, steps, cfg, size: what made these images


class Pipeline:
    """Loads once, then `pipe("a red circle", seed=1)` -> SampleResult.

    model: the MMDiT in `dtype` on `device`; text_encoders: a TextEncoders (or None to pass embeddings yourself);
    vae: a LatentVAE with its decoder (and its encoder for init images); offload: keep the parts on the CPU between
    their stages (default: when the device is not the CPU, where there is nothing to gain; sd3/sample/offload.py).
    """

    def __init__(self, model: MMDiT, cfg: Config, text_encoders: TextEncoders | None, vae: LatentVAE,
                 device: torch.device, dtype: torch.dtype, offload: bool | None = None):
        self.model = model.eval()
        self.cfg = cfg
        self.text_encoders = text_encoders
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.offload = Offload(device, enabled=device.type != "cpu" if offload is None else offload)
        for part in (text_encoders, vae):
            if part is not None:
                self.offload.move_home(part)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str | torch.device = "auto",
                        dtype: str | torch.dtype = "bf16", use_ema: bool = True, overrides: list[str] = (),
                        offload: bool | None = None, keep_vae_encoder: bool = False) -> Pipeline:
        """A checkpoint directory (or a save_dir with a `latest` file) -> a ready pipeline.

        `overrides` (`encoders.vae=PATH`, ...) repoint encoder paths when the checkpoint moved machines.
        `keep_vae_encoder`: keep the VAE's encoder half, which image-to-image (`init_image`) needs; text-to-image
        only decodes, so by default it is freed.
        """
        ckpt = open_checkpoint(checkpoint, use_ema, overrides)
        cfg = ckpt.cfg
        device, dtype = resolve_device(device), resolve_dtype(dtype)
        model = build_in_dtype(cfg, device, dtype)
        load_weights(model, ckpt.weights)

        load_device = torch.device("cpu") if (offload or (offload is None and device.type != "cpu")) else device
        text = TextEncoders.load(cfg.encoders, cfg.model.text_tokens, load_device)
        vae = LatentVAE.load(cfg.encoders.vae, cfg.encoders.vae_subfolder, load_device, cfg.encoders.vae_dtype,
                             with_decoder=True, latent_norm=cfg.encoders.latent_norm)
        if not keep_vae_encoder:
            drop_vae_encoder(vae)
        return cls(model, cfg, text, vae, device, dtype, offload)

    @classmethod
    def from_pretrained(cls, folder_or_id: str | Path, **kwargs) -> Pipeline:
        """An `sd3 export` folder or a hub repo id; kwargs as from_checkpoint's (sd3/sample/pretrained.py)."""
        from sd3.sample.pretrained import load_pretrained  # it imports this module

        return load_pretrained(cls, folder_or_id, **kwargs)

    # -- the stages ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (context (B, 2T, D), pooled (B, P)) on the device. An empty prompt is the null condition.

        Training drops a condition by zeroing it (sd3/train/flow.py cfg_dropout), so the "empty" prompt the model
        knows is all zeros, not the encoders' output for "".
        """
        cfg = self.cfg.model
        context = torch.zeros(len(prompts), 2 * cfg.text_tokens, cfg.context_dim, device=self.device)
        pooled = torch.zeros(len(prompts), cfg.pooled_dim, device=self.device)
        real = [i for i, p in enumerate(prompts) if p]
        if real:
            with self.offload.on_device(self.text_encoders):
                c, p = self.text_encoders.encode([prompts[i] for i in real])  # (b, 2T, D), (b, P)
            context[real] = c.to(self.device, torch.float32)
            pooled[real] = p.to(self.device, torch.float32)
        return context.to(self.dtype), pooled.to(self.dtype)

    @torch.inference_mode()
    def encode_image(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """An init image -> its normalised latents (1, C, h, w) fp32 on the device, resized to width x height.

        The latent distribution's mean, not a sample: the same image always gives the same latents, so strength 0
        returns exactly decode(encode(image)).
        """
        if self.vae.vae.encoder is None:
            raise ValueError("this pipeline freed its VAE encoder; load it with "
                             "Pipeline.from_checkpoint(..., keep_vae_encoder=True) to sample from an init image")
        if image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)
        pixels = to_tensor([image])  # (1, 3, H, W) in [-1, 1]
        with self.offload.on_device(self.vae):
            z = self.vae.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.mode()  # (1, C, h, w)
        return normalize(z.float(), self.vae.shift, self.vae.scale).to(self.device)

    @torch.inference_mode()
    def denoise(self, x: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                uncond: tuple[torch.Tensor, torch.Tensor] | None, cfg_scale: float, timesteps: torch.Tensor,
                sampler: str, generator: torch.Generator | None = None,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """x (B, C, h, w) fp32 at timesteps[0] -> latents x0. `uncond` None or cfg_scale 0: the conditional velocity.

        timesteps: `make_timesteps(steps, shift)`, or `enter_timesteps(...)` for an init image. callback: the
        sampler's, called after every step with {"i", "t", "t_next", "x", "x0"}.
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler '{sampler}' is not one of {', '.join(SAMPLERS)}")

        def velocity(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
            # The integration runs in fp32; only the network sees the sampling dtype. Autocast because the weights
            # are in `dtype` while the model keeps its frequency tables (RoPE, time embedding) in fp32.
            with torch.autocast(self.device.type, self.dtype, enabled=self.dtype != torch.float32):
                return self.model(x.to(self.dtype), t.float(), context, pooled).float()  # (B, C, h, w)

        cond = {"context": context, "pooled": pooled}
        if uncond is None or cfg_scale == 0:
            model_fn = lambda x, t: velocity(x, t, **cond)  # noqa: E731
        else:
            # v = v_cond + scale·(v_cond − v_uncond), cond and uncond batched into one forward (samplers.guided).
            # This is the source's (1 + s)·v_cond − s·v_uncond (SEED_SPEC §l).
            model_fn = guided(velocity, cond, {"context": uncond[0], "pooled": uncond[1]}, cfg_scale)
        return SAMPLERS[sampler](model_fn, x, timesteps.to(self.device), generator=generator, callback=callback)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        with self.offload.on_device(self.vae):
            images = self.vae.decode(latents.to(self.device))  # (B, 3, H, W) in [-1, 1]
        return to_pil(images)

    # -- prompt -> images ------------------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str], negative_prompt: str | None = None, cfg_scale: float | None = None,
                 num_steps: int | None = None, sampler: str | None = None, width: int | None = None,
                 height: int | None = None, batch_size: int | None = None, seed: int | None = None,
                 shift: float | None = None, init_image: Image.Image | str | Path | None = None,
                 strength: float | None = None, return_intermediates: bool = False,
                 progress: Callable[[int, int], None] | None = None, max_batch: int = 16) -> SampleResult:
        """`batch_size` images per prompt; unset arguments take the checkpoint's [sample] values.

        shift: the SD3 timestep shift t' = s·t / (1 + (s − 1)·t) (1 = unshifted; `make_timesteps`).
        init_image (a PIL image or a path) and strength: image-to-image. The image (resized to width x height; by
        default its own size, rounded down to multiples of 16) is encoded, noised to t = strength with each image's
        own seeded noise, and sampled from there along the full run's grid (`enter_timesteps`): strength 0 returns
        its reconstruction, strength 1 ignores it.
        Images of all prompts are denoised together, up to `max_batch` per forward. seed -1 draws a random seed.
        Image k of the call starts from noise seeded with seed + k, so with the deterministic samplers (euler,
        heun, heun_edm) any image can be re-made alone from the seed it reports; the stochastic ones
        (samplers.STOCHASTIC) also draw fresh noise per step for the whole chunk, so their images repeat for the
        same call. `progress(step, total)` is called after every sampler step.
        """
        s = self.cfg.sample
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negative = s.negative_prompt if negative_prompt is None else negative_prompt
        image = None
        if init_image is not None:
            image = open_image(init_image) if isinstance(init_image, (str, Path)) else init_image.convert("RGB")
            if width is None and height is None:  # the image's own size, on the 16-pixel grid
                width, height = (side // SIZE_MULTIPLE * SIZE_MULTIPLE for side in image.size)
        settings = Settings(
            num_steps=s.num_steps if num_steps is None else num_steps, sampler=sampler or s.sampler,
            cfg_scale=s.cfg_scale if cfg_scale is None else cfg_scale, shift=s.shift if shift is None else shift,
            strength=(s.strength if strength is None else strength) if image is not None else None,
            width=s.width if width is None else width, height=s.height if height is None else height,
            batch_size=s.batch_size if batch_size is None else batch_size)
        check_settings(settings)
        if max_batch < 1:
            raise ValueError(f"max_batch ({max_batch}) must be >= 1")
        check_size(settings.width, settings.height, self.cfg.model.max_res)
        seed = s.seed if seed is None else seed
        if seed < 0:
            seed = random.randrange(2**31)

        # All prompts (and the negative one) are encoded in one visit of the text encoders to the device.
        with self.offload.off_device(self.model):
            context_all, pooled_all = self.encode(prompts + [negative])  # (P+1, 2T, D), (P+1, P)
            init = None if image is None else self.encode_image(image, settings.width, settings.height)  # (1, C, h, w)
        if init is None:
            timesteps = make_timesteps(settings.num_steps, settings.shift)  # (N+1,)
        else:
            timesteps = enter_timesteps(settings.num_steps, settings.strength, settings.shift)  # (~strength·N + 1,)
        which = torch.arange(len(prompts)).repeat_interleave(settings.batch_size)  # image k -> its prompt
        seeds = [seed + k for k in range(len(which))]
        chunks = [range(k, min(k + max_batch, len(which))) for k in range(0, len(which), max_batch)]
        steps_per_chunk = len(timesteps) - 1

        down = self.cfg.model.vae_downsample
        images, frames = [], []
        for c_index, chunk in enumerate(chunks):
            b = len(chunk)
            rows = which[chunk.start:chunk.stop]
            context, pooled = context_all[rows], pooled_all[rows]  # (b, 2T, D), (b, P)
            uncond = (context_all[-1:].expand(b, -1, -1), pooled_all[-1:].expand(b, -1))
            noise = torch.cat([
                torch.randn(1, self.cfg.model.in_channels, settings.height // down, settings.width // down,
                            generator=torch.Generator().manual_seed(seeds[k]))
                for k in chunk]).to(self.device)  # (b, C, h, w) fp32, drawn on the CPU: same on any device
            start = float(timesteps[0])
            x = noise if init is None else (1.0 - start) * init + start * noise  # x_t on the straight path
            generator = torch.Generator(self.device).manual_seed(seeds[chunk.start] + 1)  # stochastic samplers' noise
            steps: list[torch.Tensor] = []

            def callback(info: dict, steps: list[torch.Tensor] = steps, c_index: int = c_index) -> None:
                if return_intermediates:
                    steps.append(info["x"].to("cpu", torch.float32))  # the noisy state after this step
                if progress is not None:
                    progress(c_index * steps_per_chunk + info["i"] + 1, len(chunks) * steps_per_chunk)

            if steps_per_chunk == 0:  # strength 0: the init image's own latents, no step to take
                latents = x
            else:
                latents = self.denoise(x, context, pooled, uncond, settings.cfg_scale, timesteps, settings.sampler,
                                       generator, callback)
            images += self.decode(latents)
            if return_intermediates:
                decoded = self.decode(torch.cat(steps)) if steps else []  # [step * b + image]
                frames += [decoded[i::b] + [images[-b + i]] for i in range(b)]
        used = dict(sampler=settings.sampler, num_steps=settings.num_steps, cfg_scale=settings.cfg_scale,
                    shift=settings.shift, width=settings.width, height=settings.height, negative_prompt=negative,
                    dtype=str(self.dtype).removeprefix("torch."))
        if image is not None:
            used.update(strength=settings.strength, init_image=str(init_image) if isinstance(init_image, (str, Path))
                        else "PIL image", steps_taken=steps_per_chunk)
        all_prompts = [prompts[int(i)] for i in which]
        return SampleResult(images, seeds, all_prompts, frames if return_intermediates else None, used)


def drop_vae_encoder(vae: LatentVAE) -> None:
    """Text-to-image only decodes: the VAE's encoder half is freed (a LatentVAE wraps a diffusers AutoencoderKL)."""
    vae.vae.encoder = None
    vae.vae.quant_conv = None
