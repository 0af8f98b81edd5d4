"""Prompt -> image: a checkpoint's MMDiT, its text encoders and VAE decoder, loaded once, sampled many times.

The source (003_5bc3fb5fdb7c8fe6.txt, "Inference") kept every model on the GPU in fp32 and needed ~15 GB at 512².
Here the weights are created in the sampling dtype (no fp32 copy), and each stage's models visit the device alone
(when it is not the CPU): the text encoders encode every prompt of a call while the MMDiT waits on the CPU, then the
MMDiT denoises with the encoders back on the CPU, then the VAE decoder decodes. The device's peak is the largest
stage, not the sum of all models.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open

from sd3.config import Config
from sd3.config_loader import apply_override, config_from_dict
from sd3.devices import resolve_device, resolve_dtype
from sd3.model import MMDiT, build_model
from sd3.sample.images import to_pil
from sd3.sample.samplers import SAMPLERS, guided, make_timesteps
from sd3.train.checkpoint import CONFIG_FILE, EMA_FILE, MODEL_FILE, resolve_checkpoint

SIZE_MULTIPLE = 16  # VAE /8 then patch 2: every pixel side must be a multiple of 16


def check_size(width: int, height: int, max_res: int | None = None) -> None:
    """ValueError for sides that are not multiples of 16; a warning above the resolution the model was trained at."""
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % SIZE_MULTIPLE:
            raise ValueError(f"{name} {value} is not a positive multiple of {SIZE_MULTIPLE} (VAE /8 x patch 2)")
    if max_res is not None and max(width, height) > max_res:
        warnings.warn(f"{width}x{height} is above the resolution this checkpoint was trained at ({max_res}); "
                      "expect repeated or broken structure", stacklevel=3)


def find_checkpoint(checkpoint: str | Path) -> Path:
    """A checkpoint directory itself, or a save_dir whose `latest` file names one."""
    path = Path(checkpoint)
    if (path / CONFIG_FILE).is_file():
        return path
    found = resolve_checkpoint(str(path)) if path.exists() else None
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {checkpoint} (expected a step-XXXXXXXX dir with config.json, "
                                "or a save_dir with a 'latest' file)")
    return Path(found)


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
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (ema.safetensors by default, model.safetensors with the raw weights)")
    own = model.state_dict()
    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(own.keys() - keys), sorted(keys - own.keys())
        if missing or unexpected:
            raise KeyError(f"{path}: weights do not fit the model of its config.json: "
                           f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        with torch.no_grad():
            for key in keys:
                tensor = f.get_tensor(key)
                if tensor.shape != own[key].shape:
                    raise ValueError(f"{path}: '{key}' has shape {tuple(tensor.shape)}, the model expects {tuple(own[key].shape)}")
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
    vae: a LatentVAE with its decoder; offload: keep encoders on the CPU between their stages (default: when the
    device is not the CPU, where there is nothing to gain).
    """

    def __init__(self, model: MMDiT, cfg: Config, text_encoders, vae, device: torch.device, dtype: torch.dtype,
                 offload: bool | None = None):
        self.model = model.eval()
        self.cfg = cfg
        self.text_encoders = text_encoders
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.offload = device.type != "cpu" if offload is None else offload
        self.home = torch.device("cpu") if self.offload else device  # where encoders wait between stages
        for part in (text_encoders, vae):
            if part is not None:
                move(part, self.home)

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, device: str | torch.device = "auto",
                        dtype: str | torch.dtype = "bf16", use_ema: bool = True, overrides: list[str] = (),
                        offload: bool | None = None) -> Pipeline:
        """A checkpoint directory (or a save_dir with a `latest` file) -> a ready pipeline.

        `overrides` (`encoders.vae=PATH`, ...) repoint encoder paths when the checkpoint moved machines.
        """
        from sd3.encoders.text import TextEncoders
        from sd3.encoders.vae import LatentVAE

        path = find_checkpoint(checkpoint)
        cfg = config_from_dict(json.loads((path / CONFIG_FILE).read_text()), source=str(path / CONFIG_FILE))
        for item in overrides:
            apply_override(cfg, item)
        device, dtype = resolve_device(device), resolve_dtype(dtype)

        weights = path / (EMA_FILE if use_ema else MODEL_FILE)
        model = build_in_dtype(cfg, device, dtype)
        load_weights(model, weights)

        load_device = torch.device("cpu") if (offload or (offload is None and device.type != "cpu")) else device
        text = TextEncoders.load(cfg.encoders, cfg.model.text_tokens, load_device)
        vae = LatentVAE.load(cfg.encoders.vae, cfg.encoders.vae_subfolder, load_device, cfg.encoders.vae_dtype,
                             with_decoder=True)
        drop_vae_encoder(vae)
        return cls(model, cfg, text, vae, device, dtype, offload)

    @classmethod
    def from_pretrained(cls, folder_or_id: str | Path, **kwargs) -> Pipeline:
        """An `sd3 export` folder or a hub repo id; kwargs as from_checkpoint's (sd3/sample/pretrained.py)."""
        from sd3.sample.pretrained import load_pretrained  # it imports this module

        return load_pretrained(cls, folder_or_id, **kwargs)

    # -- the three stages ------------------------------------------------------------------------------------

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
            with self.on_device(self.text_encoders):
                c, p = self.text_encoders.encode([prompts[i] for i in real])  # (b, 2T, D), (b, P)
            context[real] = c.to(self.device, torch.float32)
            pooled[real] = p.to(self.device, torch.float32)
        return context.to(self.dtype), pooled.to(self.dtype)

    @torch.inference_mode()
    def denoise(self, noise: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                uncond: tuple[torch.Tensor, torch.Tensor] | None, cfg_scale: float, num_steps: int, sampler: str,
                generator: torch.Generator | None = None,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Noise (B, C, h, w) fp32 -> latents x0. `uncond` None or cfg_scale 0: the conditional velocity alone.

        callback: the sampler's, called after every step with {"i", "t", "t_next", "x", "x0"}.
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
            model_fn = guided(velocity, cond, {"context": uncond[0], "pooled": uncond[1]}, cfg_scale)
        timesteps = make_timesteps(num_steps).to(self.device)
        return SAMPLERS[sampler](model_fn, noise, timesteps, generator=generator, callback=callback)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        with self.on_device(self.vae):
            images = self.vae.decode(latents.to(self.device))  # (B, 3, H, W) in [-1, 1]
        return to_pil(images)

    # -- prompt -> images ------------------------------------------------------------------------------------

    def __call__(self, prompt: str | list[str], negative_prompt: str | None = None, cfg_scale: float | None = None,
                 num_steps: int | None = None, sampler: str | None = None, width: int | None = None,
                 height: int | None = None, batch_size: int | None = None, seed: int | None = None,
                 return_intermediates: bool = False, progress: Callable[[int, int], None] | None = None,
                 max_batch: int = 16) -> SampleResult:
        """`batch_size` images per prompt; unset arguments take the checkpoint's [sample] values.

        Images of all prompts are denoised together, up to `max_batch` per forward. seed -1 draws a random seed.
        Image k of the call starts from noise seeded with seed + k, so with the deterministic samplers (euler,
        heun) any image can be re-made alone from the seed it reports; euler_stochastic also draws fresh noise
        per step for the whole chunk, so its images repeat for the same call. `progress(step, total)` is called
        after every sampler step.
        """
        s = self.cfg.sample
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negative = s.negative_prompt if negative_prompt is None else negative_prompt
        cfg_scale = s.cfg_scale if cfg_scale is None else cfg_scale
        num_steps = s.num_steps if num_steps is None else num_steps
        sampler = sampler or s.sampler
        width = s.width if width is None else width
        height = s.height if height is None else height
        batch_size = s.batch_size if batch_size is None else batch_size
        if batch_size < 1 or num_steps < 1 or max_batch < 1:
            raise ValueError(f"batch_size ({batch_size}), num_steps ({num_steps}) and max_batch ({max_batch}) must be >= 1")
        seed = s.seed if seed is None else seed
        check_size(width, height, self.cfg.model.max_res)
        if seed < 0:
            seed = random.randrange(2**31)

        # All prompts (and the negative one) are encoded in one visit of the text encoders to the device.
        with self.off_device(self.model):
            context_all, pooled_all = self.encode(prompts + [negative])  # (P+1, 2T, D), (P+1, P)
        which = torch.arange(len(prompts)).repeat_interleave(batch_size)  # image k -> its prompt
        seeds = [seed + k for k in range(len(which))]
        chunks = [range(k, min(k + max_batch, len(which))) for k in range(0, len(which), max_batch)]

        down = self.cfg.model.vae_downsample
        images, frames = [], []
        for c_index, chunk in enumerate(chunks):
            b = len(chunk)
            rows = which[chunk.start:chunk.stop]
            context, pooled = context_all[rows], pooled_all[rows]  # (b, 2T, D), (b, P)
            uncond = (context_all[-1:].expand(b, -1, -1), pooled_all[-1:].expand(b, -1))
            noise = torch.cat([
                torch.randn(1, self.cfg.model.in_channels, height // down, width // down,
                            generator=torch.Generator().manual_seed(seeds[k]))
                for k in chunk]).to(self.device)  # (b, C, h, w) fp32, drawn on the CPU: same on any device
            generator = torch.Generator(self.device).manual_seed(seeds[chunk.start] + 1)  # stochastic samplers' noise
            steps: list[torch.Tensor] = []

            def callback(info: dict) -> None:
                if return_intermediates:
                    steps.append(info["x"].to("cpu", torch.float32))  # the noisy state after this step
                if progress is not None:
                    progress(c_index * num_steps + info["i"] + 1, len(chunks) * num_steps)

            latents = self.denoise(noise, context, pooled, uncond, cfg_scale, num_steps, sampler, generator, callback)
            images += self.decode(latents)
            if return_intermediates:
                decoded = self.decode(torch.cat(steps))  # [step * b + image]
                frames += [decoded[i::b] + [images[-b + i]] for i in range(b)]
        settings = dict(sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale, width=width, height=height,
                        negative_prompt=negative, dtype=str(self.dtype).removeprefix("torch."))
        all_prompts = [prompts[int(i)] for i in which]
        return SampleResult(images, seeds, all_prompts, frames if return_intermediates else None, settings)

    # -- device juggling -------------------------------------------------------------------------------------

    def on_device(self, part) -> _Visit:
        return _Visit(part, self.device, self.home)

    def off_device(self, part) -> _Visit:
        """While the text encoders run, the MMDiT waits on the CPU: one stage's models on the device at a time."""
        return _Visit(part, self.home, self.device)


def drop_vae_encoder(vae) -> None:
    """Sampling only decodes: the VAE's encoder half is freed (a LatentVAE wraps a diffusers AutoencoderKL)."""
    vae.vae.encoder = None
    vae.vae.quant_conv = None


def move(part, device: torch.device) -> None:
    """Move an nn.Module, or a TextEncoders / LatentVAE (each holds its nn.Modules and the `device` its inputs go to)."""
    if isinstance(part, torch.nn.Module):
        part.to(device)
        return
    for value in vars(part).values():
        if isinstance(value, torch.nn.Module):
            value.to(device)
    part.device = device


class _Visit:
    """`with pipe.on_device(part):` moves a part to `there` and back afterwards; a no-op when both are the same."""

    def __init__(self, part, there: torch.device, back: torch.device):
        self.part, self.there, self.back = part, there, back

    def __enter__(self):
        if self.there != self.back:
            move(self.part, self.there)
            _release(self.back)
        return self.part

    def __exit__(self, *exc) -> None:
        if self.there != self.back:
            move(self.part, self.back)
            _release(self.there)


def _release(device: torch.device) -> None:
    """Hand the memory of the weights that just left a GPU back to the driver, for the next stage's models."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
