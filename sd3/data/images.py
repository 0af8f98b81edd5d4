"""Image bytes -> RGB pixels without ever raising: every failure becomes a `BadImage` with a reason.

Loaders decode millions of rows from the web; one odd file must cost one skipped row, not a dead rank.
The guard covers: empty bytes, garbage, truncated files (PIL decodes lazily, so `load()` is inside the guard),
decompression bombs (PIL's MAX_IMAGE_PIXELS), EXIF orientation, and every pixel mode, converted to 8-bit
RGB with transparency composited on white (a black background would teach the model black halos).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

WHITE = (255, 255, 255)


class BadImage(Exception):
    """An image that cannot be used; `reason` is one of batches.SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit grey ('I;16*', 'I') and float ('F') -> 8-bit 'L' by scaling, not clipping."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr * 255.0 if np.nanmax(arr) <= 1.0 else arr
        return Image.fromarray(np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8), "L")
    arr = arr.astype(np.int64)
    if img.mode.startswith("I;16") or arr.max() > 255:
        arr = arr >> 8  # 16-bit range
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 'RGB'; alpha (RGBA, LA, PA, P with transparency) is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return _high_bit_depth_to_l(img).convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes | None, min_side: int = 1) -> Image.Image:
    """Encoded bytes -> an RGB image, upright per its EXIF orientation. Raises BadImage(reason) on any failure.

    Reasons: empty_image (None or zero bytes), too_large (more pixels than PIL's MAX_IMAGE_PIXELS; PIL itself
    raises above twice that), truncated, decode_error (not an image, corrupt), too_small (a side < min_side).
    """
    if data is None or len(data) == 0:
        raise BadImage("empty_image")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadImage("decode_error", f"image is {type(data).__name__}, not bytes")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only; raises above 2x MAX_IMAGE_PIXELS
        # Between 1x and 2x the limit PIL only warns (once); such rows are skipped too.
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:
            raise BadImage("too_large", f"{img.width}x{img.height} pixels > MAX_IMAGE_PIXELS {limit}")
        img.load()
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage("too_large", str(e)) from None
    except UnidentifiedImageError as e:
        raise BadImage("decode_error", str(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = "truncated" if "truncat" in str(e).lower() or isinstance(e, EOFError) else "decode_error"
        raise BadImage(reason, str(e)) from None
    except Exception as e:  # a decoder plugin bug must still only cost one row
        raise BadImage("decode_error", f"{type(e).__name__}: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass  # an unreadable EXIF block leaves the pixels usable, as stored
    try:
        img = to_rgb(img)
    except Exception as e:
        raise BadImage("decode_error", f"mode {img.mode}: {e}") from None
    if min(img.size) < min_side:
        raise BadImage("too_small", f"{img.width}x{img.height}")
    return img


def resize(img: Image.Image, height: int, width: int) -> Image.Image:
    """LANCZOS resize to exactly (height, width)."""
    if img.size == (width, height):
        return img
    return img.resize((width, height), Image.Resampling.LANCZOS)


def encode_image(img: Image.Image, fmt: str = "png", quality: int = 95) -> bytes:
    """RGB image -> bytes: png (lossless), jpeg or webp (lossy, at `quality`)."""
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    elif fmt in ("jpeg", "jpg"):
        img.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(f"image format {fmt!r} not one of png, jpeg, webp")
    return buf.getvalue()


def to_array(img: Image.Image) -> np.ndarray:
    """RGB image -> (H, W, 3) uint8."""
    return np.asarray(img, dtype=np.uint8)
