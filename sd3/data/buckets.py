"""Bucket sizes: which (height, width) an image is stored at by create-phase.

Two modes:
- `exact` (the source's behaviour): scale so the long side is at most max_res (never upscale), then round each
  side to the nearest multiple of the patch size. Each side stays within half a patch of the exact scaled
  side, so the aspect ratio is kept to within one patch; a large corpus ends up with many buckets.
- `area` (as SDXL-era trainers do): a fixed list of sizes of about max_res² pixels with aspect ratios from 1:4
  to 4:1; an image goes to the bucket of nearest aspect ratio (in log space), is scaled to cover it and
  centre-cropped. Far fewer buckets, so batches fill up on small datasets.
"""

from __future__ import annotations

import math
from functools import cache

from PIL import Image

from sd3.data.images import resize

BUCKET_MODES = ("exact", "area")


def bucket_name(height: int, width: int) -> str:
    """"HxW", height first."""
    return f"{height}x{width}"


def _round_to(x: float, multiple: int) -> int:
    return int(math.floor(x / multiple + 0.5)) * multiple


def exact_size(height: int, width: int, max_res: int, patch_size: int = 16) -> tuple[int, int]:
    """(height, width) rounded to multiples of patch_size with the long side <= max_res. A side may be 0
    (the image is too thin or small to keep)."""
    scale = min(1.0, max_res / max(height, width))
    h = _round_to(height * scale, patch_size)
    w = _round_to(width * scale, patch_size)
    cap = max_res // patch_size * patch_size  # rounding up must not pass max_res
    return min(h, cap), min(w, cap)


@cache
def area_buckets(max_res: int, patch_size: int = 16) -> tuple[tuple[int, int], ...]:
    """Sizes (height, width), multiples of patch_size, of at most max_res² pixels, aspect 1:4 .. 4:1."""
    target = max_res * max_res
    sizes = set()
    for h in range(max_res // 2 // patch_size * patch_size, 2 * max_res + 1, patch_size):
        if h <= 0:
            continue
        w = target // h // patch_size * patch_size
        if w >= h // 4 and h >= w // 4 and w > 0:
            sizes.add((h, w))
            sizes.add((w, h))
    return tuple(sorted(sizes))


def area_size(height: int, width: int, max_res: int, patch_size: int = 16) -> tuple[int, int]:
    """The area bucket whose aspect ratio is nearest the image's."""
    aspect = math.log(width / height)
    return min(area_buckets(max_res, patch_size), key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def target_size(height: int, width: int, max_res: int, patch_size: int, mode: str) -> tuple[int, int]:
    if mode == "exact":
        return exact_size(height, width, max_res, patch_size)
    if mode == "area":
        return area_size(height, width, max_res, patch_size)
    raise ValueError(f"bucket mode {mode!r} not one of {', '.join(BUCKET_MODES)}")


def fit(img: Image.Image, height: int, width: int, mode: str) -> Image.Image:
    """Resize an RGB image into its bucket: exact = plain resize; area = cover then centre-crop."""
    if mode == "exact":
        return resize(img, height, width)
    scale = max(height / img.height, width / img.width)
    covered = resize(img, max(height, round(img.height * scale)), max(width, round(img.width * scale)))
    top = (covered.height - height) // 2
    left = (covered.width - width) // 2
    return covered.crop((left, top, left + width, top + height))
