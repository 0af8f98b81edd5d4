"""Training the tiny VAE on synthetic shapes, so the quick start's images decode to recognisable shapes.

The shipped weights sd3/assets/tiny_vae.safetensors were made by the project's own command, in four runs
(about 40 minutes on 2 shared CPU cores): 2000 steps on 32x32 crops from scratch, then 2000 + 1500 on whole images
(each run warms up, holds the learning rate, then decays it; held-out PSNR 21.2 -> 25.6 -> 26.7 dB), then 1500 on
whole images of the current shapes data (large chromatic shapes on white or black; 24.1 -> 30.0 dB on them):
    sd3 make-tiny --out /tmp/a --vae-weights none --train-vae-steps 2000 --vae-crop 32 --vae-batch 16 \
        --save-asset /tmp/a.safetensors
    sd3 make-tiny --out /tmp/b --vae-weights /tmp/a.safetensors --train-vae-steps 2000 --save-asset /tmp/b.safetensors
    sd3 make-tiny --out /tmp/c --vae-weights /tmp/b.safetensors --train-vae-steps 1500 --save-asset /tmp/c.safetensors
    sd3 make-tiny --out data/tiny-models --vae-weights /tmp/c.safetensors --train-vae-steps 1500 \
        --save-asset sd3/assets/tiny_vae.safetensors
The architecture is FLUX.1's VAE class (AutoencoderKL, 16 latent channels, /8) made narrow, without the mid-block
attention (fully convolutional). Whole images matter at the end: GroupNorm statistics over a crop differ from those
over the whole image, and crop-only training stalls near 21 dB on whole held-out images.
Images are the shapes of sd3.data.synthetic resized the way create-phase stores them for the tiny-cpu preset
(long side 64, sides multiples of 16). The loss is the pixel MSE plus a small KL term, on posterior samples, as the
loader encodes with a sample. After training, shift/scale are set to the mean and 1/std of the latents (what the
FLUX.1 VAE's shift_factor/scaling_factor are), so the MMDiT sees latents of unit variance.
Reconstruction is measured by PSNR (peak 1 on [0, 1] pixels) over held-out shapes drawn with another seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from sd3.data.buckets import fit, target_size
from sd3.data.images import to_array
from sd3.data.synthetic import make_shapes
from sd3.encoders.vae import LatentVAE

MAX_RES = 64  # the tiny-cpu preset's data.max_res
HELDOUT_SEED = 1_000_003  # held-out shapes never share a seed with training shapes


def shape_images(n: int, seed: int, max_res: int = MAX_RES) -> Iterator[torch.Tensor]:
    """`n` shapes images as create-phase stores them (exact buckets): each (3, H, W) float32 in [-1, 1]."""
    for sample in make_shapes(n, seed):
        height, width = target_size(sample.image.height, sample.image.width, max_res, 16, "exact")
        pixels = to_array(fit(sample.image, height, width, "exact"))  # (H, W, 3) uint8
        yield torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def crop_batches(batch_size: int, seed: int, crop: int = 32, max_res: int = MAX_RES) -> Iterator[torch.Tensor]:
    """Endless batches (B, 3, crop, crop) of random crops of phase-sized shapes images; crop=0: whole images,
    each batch of one bucket size.

    Crops keep the pixel statistics of the real images (edge sharpness, shape size in pixels) at a quarter of the
    cost of whole 64x64 images, and let images of every bucket share a batch.
    """
    if crop == 0:
        yield from whole_batches(batch_size, seed, max_res)
        return
    rng = np.random.default_rng(seed)
    images = shape_images(2**62, seed, max_res)
    while True:
        batch = []
        for image in images:
            top = int(rng.integers(image.shape[1] - crop + 1))
            left = int(rng.integers(image.shape[2] - crop + 1))
            batch.append(image[:, top : top + crop, left : left + crop])
            if len(batch) == batch_size:
                break
        yield torch.stack(batch)  # (B, 3, crop, crop)


def whole_batches(batch_size: int, seed: int, max_res: int = MAX_RES) -> Iterator[torch.Tensor]:
    """Endless batches (B, 3, H, W) of whole images, each of one size: images are queued per size."""
    queues: dict[tuple[int, int], list[torch.Tensor]] = {}
    for image in shape_images(2**62, seed, max_res):
        queue = queues.setdefault(tuple(image.shape[1:]), [])
        queue.append(image)
        if len(queue) == batch_size:
            yield torch.stack(queue)
            queue.clear()


def shape_sets(n: int, seed: int = HELDOUT_SEED, max_res: int = MAX_RES) -> list[torch.Tensor]:
    """`n` shapes grouped by size (default: the held-out ones): a list of (B, 3, H, W) tensors."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for image in shape_images(n, seed, max_res):
        groups.setdefault(tuple(image.shape[1:]), []).append(image)
    return [torch.stack(g) for g in groups.values()]


def psnr(vae: LatentVAE, sets: list[torch.Tensor], seed: int = 0) -> float:
    """PSNR in dB of encode -> decode (through the loader's path: posterior sample, shift/scale) over all pixels."""
    generator = torch.Generator().manual_seed(seed)
    squared, count = 0.0, 0
    for images in sets:
        recon = vae.decode(vae.encode(images, generator)).clamp(-1, 1).cpu()
        squared += float(((recon - images) / 2).pow(2).sum())  # on [0, 1] pixels
        count += images.numel()
    return 10 * math.log10(1.0 / (squared / count))


def set_latent_stats(vae: AutoencoderKL, sets: list[torch.Tensor]) -> None:
    """shift = mean, scale = 1/std of the posterior means over `sets`, written into the VAE's config."""
    with torch.inference_mode():
        z = torch.cat([vae.encode(images).latent_dist.mean.flatten() for images in sets])
    vae.register_to_config(shift_factor=round(float(z.mean()), 4), scaling_factor=round(1.0 / float(z.std()), 4))


def train_tiny_vae(vae: AutoencoderKL, steps: int, seed: int = 0, batch_size: int = 16, lr: float = 1e-3,
                   kl_weight: float = 1e-6, crop: int = 32, eval_every: int = 250) -> AutoencoderKL:
    """Train `vae` in place on endless shapes crops (fresh images every step, so nothing is memorised).

    Runs on one CPU thread: these convolutions are small, and on a shared machine a second thread mostly waits
    (measured: 0.35 s/step with one thread vs 12 s with two under load). Every `eval_every` steps the held-out
    PSNR (64 images, whole, through the loader's encode path) is printed.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(vae, steps, seed, batch_size, lr, kl_weight, crop, eval_every)
    finally:
        torch.set_num_threads(threads)


def _train(vae: AutoencoderKL, steps: int, seed: int, batch_size: int, lr: float, kl_weight: float, crop: int,
           eval_every: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # At initialisation the posterior's log-variance is ~0, so samples carry noise of std ~1 that hides the image
    # from the decoder; starting it at most at -6 (std 0.05) lets reconstruction learn at once (a trained VAE
    # being fine-tuned keeps its lower value).
    latent_channels = vae.config.latent_channels
    with torch.no_grad():
        vae.encoder.conv_out.bias[latent_channels:].clamp_(max=-6.0)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    # Constant after a short warm-up, then cosine to zero over the last 30%: most steps at full rate.
    warmup, decay_from = min(50, max(1, steps // 10)), int(0.7 * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_from:
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - decay_from) / max(1, steps - decay_from)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    batches = crop_batches(batch_size, seed, crop)
    heldout = shape_sets(64) if eval_every else []
    bar = tqdm(range(steps), desc="tiny VAE", unit="step")
    for step in bar:
        images = next(batches)  # (B, 3, crop, crop)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        mse = torch.nn.functional.mse_loss(recon, images)
        loss = mse + kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(train_psnr=f"{10 * math.log10(4.0 / max(mse.item(), 1e-12)):.1f}")
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            vae.eval()
            with torch.no_grad():
                value = psnr(LatentVAE(vae, torch.device("cpu")), heldout)
            bar.write(f"tiny VAE step {step + 1}: held-out PSNR {value:.2f} dB")
            vae.train()
    vae.eval().requires_grad_(False)
    return vae


def save_vae_weights(vae: AutoencoderKL, path: Path) -> None:
    """State dict in fp16 (halves the shipped file; the tiny VAE runs in fp32) + latent statistics as metadata."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in vae.state_dict().items()}
    meta = {"shift_factor": str(vae.config.shift_factor), "scaling_factor": str(vae.config.scaling_factor)}
    save_file(tensors, str(path), metadata=meta)


def load_vae_weights(vae: AutoencoderKL, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    vae.load_state_dict(state)
    vae.register_to_config(shift_factor=float(meta.get("shift_factor", 0.0)),
                           scaling_factor=float(meta.get("scaling_factor", 1.0)))


def train_and_install(out_dir: Path, steps: int, seed: int = 0, asset: str | None = None, heldout: int = 256,
                      lr: float = 1e-3, batch_size: int = 16, crop: int = 32) -> float:
    """Train the VAE in out_dir/flux/vae for `steps`, write it back (and to `asset`); returns held-out PSNR."""
    folder = Path(out_dir) / "flux" / "vae"
    vae = AutoencoderKL.from_pretrained(folder)
    train_tiny_vae(vae, steps, seed, batch_size=batch_size, lr=lr, crop=crop)
    set_latent_stats(vae, shape_sets(512, seed + 1))
    if asset:
        save_vae_weights(vae, Path(asset))
        load_vae_weights(vae, Path(asset))  # so out_dir holds exactly what is shipped (fp16-rounded)
    vae.save_pretrained(folder)
    return psnr(LatentVAE.load(str(Path(out_dir) / "flux"), "vae", "cpu", "fp32"), shape_sets(heldout))
