"""Turning decoded tensors into files: PIL conversion, file names, grids and the denoising GIF."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] (the VAE's range) -> B RGB images."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy(), mode="RGB") for p in pixels]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """B RGB images of one size -> (B, 3, H, W) float32 in [-1, 1], the VAE's input range."""
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def slug(prompt: str, max_len: int = 48) -> str:
    """A file-name-safe, lower-case summary of a prompt: 'A red circle!' -> 'a-red-circle'."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:max_len].rstrip("-") or "empty"


def image_name(seed: int, prompt: str, suffix: str = ".png") -> str:
    """Named by seed first so a listing groups re-runs; the slug says what was asked for."""
    return f"{seed}_{slug(prompt)}{suffix}"


def make_grid(images: list[Image.Image], columns: int | None = None, pad: int = 2) -> Image.Image:
    """Images of one size tiled row by row on a white background; columns default to ~sqrt(n)."""
    if not images:
        raise ValueError("make_grid: no images")
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    w, h = images[0].size
    grid = Image.new("RGB", (columns * w + (columns + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid.paste(image, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def save_gif(frames: list[Image.Image], path: str | Path, duration_ms: int = 80, hold_last_ms: int = 1000) -> Path:
    """An animated GIF of the denoising process; the final image is held so it can be seen."""
    path = Path(path)
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path
