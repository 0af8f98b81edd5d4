"""Small builders for data tests: encoded images of every awkward kind and hand-made phase shards."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from sd3.data.shards import PHASE_SCHEMA, write_table


def png(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def solid_png(height: int = 64, width: int = 64, colour=(200, 30, 30)) -> bytes:
    return png(Image.new("RGB", (width, height), colour))


def bomb_png(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR claims width x height (the CRC is fixed so PIL reads the header)."""
    data = bytearray(solid_png(8, 8))
    # Signature (8) + chunk length (4) + b"IHDR" (4), then width and height, big-endian.
    struct.pack_into(">II", data, 16, width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF  # over the chunk type and its 13 data bytes
    struct.pack_into(">I", data, 29, crc)
    return bytes(data)


def cmyk_jpeg(height: int = 64, width: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (width, height), (0, 255, 255, 0)).save(buf, format="JPEG", quality=95)  # red in CMYK
    return buf.getvalue()


def palette_transparent_png(height: int = 64, width: int = 64) -> bytes:
    """Palette image: left half colour 1 (blue), right half colour 0, which is transparent."""
    img = Image.new("P", (width, height), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(1, (0, 0, width // 2, height))
    return png(img, transparency=0)


def sixteen_bit_png(height: int = 64, width: int = 64) -> bytes:
    arr = np.full((height, width), 65535, dtype=np.uint16)
    arr[:, : width // 2] = 32896  # ~ 128 in 8 bits
    return png(Image.fromarray(arr))  # mode I;16


def la_png(height: int = 64, width: int = 64) -> bytes:
    """Grey 0 (black) everywhere, fully transparent on the right half."""
    arr = np.zeros((height, width, 2), dtype=np.uint8)
    arr[:, : width // 2, 1] = 255
    return png(Image.fromarray(arr, "LA"))


def exif_rotated_jpeg() -> bytes:
    """Stored 32 wide x 64 tall with a red block at the stored top-left, EXIF orientation 6 (rotate 90° CW to view).

    Viewed upright it is 64 wide x 32 tall with the red block at the top-right."""
    img = Image.new("RGB", (32, 64), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def truncated_png() -> bytes:
    rng = np.random.default_rng(0)
    data = png(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    return data[: len(data) // 2]


def random_bytes() -> bytes:
    return np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()


def phase_row(image: bytes | None, caption="A red square.", short="red square", height=64, width=64) -> dict:
    return {
        "image": image,
        "recaption": caption,
        "recaption_short": short,
        "height": height,
        "width": width,
        "aspect_ratio": width / height,
        "bucket_size": f"{height}x{width}",
    }


def write_phase_shard(path: Path, rows: list[dict], schema: pa.Schema = PHASE_SCHEMA, row_group_rows: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table(path, pa.Table.from_pylist(rows, schema=schema), row_group_rows=row_group_rows)
    return path
