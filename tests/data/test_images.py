"""The decode guard: every bad kind of image bytes becomes a BadImage with its reason; odd but valid modes
become correct RGB."""

import io

import numpy as np
import pytest
from PIL import Image

from sd3.data.images import BadImage, decode_image, to_array

from . import helpers


@pytest.mark.parametrize(
    "make, reason",
    [
        (helpers.truncated_png, "truncated"),
        (helpers.random_bytes, "decode_error"),
        (lambda: b"", "empty_image"),
        (lambda: None, "empty_image"),
        (lambda: helpers.solid_png(1, 1), "too_small"),
        (lambda: helpers.bomb_png(20_000, 20_000), "too_large"),  # 4e8 px > 2 x MAX_IMAGE_PIXELS: PIL raises
        (lambda: helpers.bomb_png(10_000, 10_000), "too_large"),  # 1e8 px, between 1x and 2x: PIL only warns
    ],
    ids=["truncated", "random", "zero-bytes", "none", "1x1", "bomb-2x", "bomb-1x"],
)
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_bytes_raise_badimage_with_reason(make, reason):
    assert 2 * Image.MAX_IMAGE_PIXELS > 10_000 * 10_000 > Image.MAX_IMAGE_PIXELS  # the cases test both sides of 2x
    with pytest.raises(BadImage) as e:
        decode_image(make(), min_side=8)
    assert e.value.reason == reason


def test_cmyk_becomes_rgb():
    arr = to_array(decode_image(helpers.cmyk_jpeg()))
    assert arr.shape == (64, 64, 3)
    assert arr[..., 0].mean() > 200 and arr[..., 1].mean() < 60 and arr[..., 2].mean() < 60  # red


def test_palette_transparency_composited_on_white():
    arr = to_array(decode_image(helpers.palette_transparent_png()))
    assert (arr[:, :32] == [0, 0, 255]).all()  # opaque blue half
    assert (arr[:, 32:] == 255).all()  # transparent half -> white, not black


def test_la_alpha_composited_on_white():
    arr = to_array(decode_image(helpers.la_png()))
    assert (arr[:, :32] == 0).all() and (arr[:, 32:] == 255).all()


def test_16_bit_is_scaled_not_clipped():
    img = decode_image(helpers.sixteen_bit_png())
    arr = to_array(img)
    assert img.mode == "RGB"
    assert (arr[:, 32:] == 255).all()
    assert (arr[:, :32] == 128).all()  # 32896 >> 8; clipping would give 255


def test_exif_orientation_6_is_applied():
    img = decode_image(helpers.exif_rotated_jpeg())
    assert img.size == (64, 32)  # (width, height): the stored 32x64 turned upright
    arr = to_array(img).astype(int)
    top_right, top_left = arr[:8, -8:].mean(axis=(0, 1)), arr[:8, :8].mean(axis=(0, 1))
    assert top_right[0] > 200 and top_right[1] < 80  # the red block moved to the top right
    assert top_left.min() > 200  # white


@pytest.mark.parametrize(
    "mode, fmt",
    [("1", "PNG"), ("L", "PNG"), ("RGBA", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("CMYK", "TIFF"), ("YCbCr", "JPEG")],
)
def test_other_modes_all_become_rgb(mode, fmt):
    buf = io.BytesIO()
    Image.new(mode, (16, 16)).save(buf, format=fmt)
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.size == (16, 16)


def test_transparent_rgba_is_white():
    assert np.asarray(decode_image(helpers.png(Image.new("RGBA", (16, 16), (0, 0, 0, 0))))).min() == 255
