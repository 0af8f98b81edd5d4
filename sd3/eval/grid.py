"""A grid of images with each image's prompt written under it (the validation grid, the model card's picture)."""

from __future__ import annotations

import math
import textwrap

from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 128  # pixels: smaller images (the tiny model's 64²) are enlarged so a caption line fits under them


def captioned_grid(images: list[Image.Image], captions: list[str], columns: int | None = None,
                   font_size: int = 11, pad: int = 4) -> Image.Image:
    """Images of one size tiled row by row, `captions[i]` wrapped under image i, on white; columns ~sqrt(n)."""
    if not images or len(images) != len(captions):
        raise ValueError(f"captioned_grid: {len(images)} images and {len(captions)} captions")
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    w, h = images[0].size
    scale = max(1, math.ceil(MIN_CELL / w))  # nearest-neighbour enlargement keeps the pixels the model drew
    cw, ch = w * scale, h * scale
    font = ImageFont.load_default(font_size)
    char_w = max(1.0, font.getlength("n"))
    wrapped = [textwrap.wrap(c, max(8, int(cw / char_w))) or [""] for c in captions]
    line_h = font_size + 2
    text_h = line_h * max(len(lines) for lines in wrapped) + pad
    grid = Image.new("RGB", (columns * (cw + pad) + pad, rows * (ch + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, wrapped, strict=True)):
        r, c = divmod(i, columns)
        x, y = pad + c * (cw + pad), pad + r * (ch + text_h + pad)
        grid.paste(image.resize((cw, ch), Image.NEAREST), (x, y))
        for k, line in enumerate(lines):
            draw.text((x, y + ch + pad // 2 + k * line_h), line, fill="black", font=font)
    return grid
