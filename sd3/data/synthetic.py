"""Synthetic "shapes" data: a coloured shape on a white or black background, with captions stating colour, shape
and position, at several sizes and aspect ratios. Enough to try every stage offline and to check that a
small model learns to follow its captions (the labels are returned alongside each image).

    >>> samples = list(make_shapes(4, seed=0))
    >>> samples[0].labels.colour, samples[0].recaption_short
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from sd3.data.images import encode_image
from sd3.data.shards import write_table

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
# Shapes take the six chromatic colours, backgrounds the two neutral ones. A caption then names one chromatic colour,
# and a small model from scratch can tie it to the shape within the quick start's few minutes; with two chromatic
# colours per caption it must first learn which of them is the shape's (bench learn: 12% shape colour, chance).
SHAPES_VERSION = 2  # bumped whenever the images or captions change, so prepared datasets are remade
SHAPE_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = ("white", "black")
SHAPES = ("circle", "square", "triangle", "diamond", "star")
# 3x3 grid of shape centres at 1/4, 1/2 and 3/4 of each side: (row, column) -> name, and the long captions' phrase.
POSITIONS: dict[str, tuple[int, int, str]] = {
    "top left": (0, 0, "in the top left of"),
    "top": (0, 1, "at the top of"),
    "top right": (0, 2, "in the top right of"),
    "left": (1, 0, "on the left of"),
    "center": (1, 1, "in the center of"),
    "right": (1, 2, "on the right of"),
    "bottom left": (2, 0, "in the bottom left of"),
    "bottom": (2, 1, "at the bottom of"),
    "bottom right": (2, 2, "in the bottom right of"),
}
SIZES = ((64, 64), (96, 96), (128, 128), (128, 96), (96, 128), (128, 64), (64, 128))  # (width, height)
LONG_TEMPLATES = (
    "{a} {colour} {shape} {where} a {background} background.",
    "The image shows {a_lower} {colour} {shape} {where} a plain {background} background.",
    "{a} {colour} {shape} is drawn {where} a {background} background.",
)


@dataclass(frozen=True)
class ShapeLabels:
    shape: str
    colour: str
    background: str
    position: str
    width: int
    height: int
    scale: float  # shape size (its circle's diameter) as a fraction of the short side


@dataclass
class ShapeSample:
    image: Image.Image  # RGB
    recaption: str
    recaption_short: str
    labels: ShapeLabels


def sample_labels(rng: np.random.Generator) -> ShapeLabels:
    colour = SHAPE_COLOURS[rng.integers(len(SHAPE_COLOURS))]
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    width, height = SIZES[rng.integers(len(SIZES))]
    return ShapeLabels(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=colour,
        background=background,
        position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        width=int(width),
        height=int(height),
        scale=float(rng.uniform(0.4, 0.5)),
    )


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -np.pi / 2 + k * np.pi / 5
        points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
    return points


def render(labels: ShapeLabels) -> Image.Image:
    """The image of `labels` (deterministic)."""
    w, h = labels.width, labels.height
    img = Image.new("RGB", (w, h), COLOURS[labels.background])
    draw = ImageDraw.Draw(img)
    row, col, _ = POSITIONS[labels.position]
    cx, cy = (col + 1) * w / 4, (row + 1) * h / 4
    # Large shapes (up to half the short side, a fifth of the image) are recognisable at 64 px, where the model
    # sees them on a 4x4 grid of tokens; centred at quarter points they still fit inside the image.
    r = labels.scale * min(w, h) / 2
    fill = COLOURS[labels.colour]
    if labels.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif labels.shape == "square":
        draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
    elif labels.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif labels.shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)], fill=fill)
    elif labels.shape == "star":
        draw.polygon(_star(cx, cy, r), fill=fill)
    else:
        raise ValueError(f"unknown shape {labels.shape!r} (one of {', '.join(SHAPES)})")
    return img


def captions(labels: ShapeLabels, rng: np.random.Generator) -> tuple[str, str]:
    """(long, short) captions, e.g. "A red circle in the top left of a white background." and
    "red circle, top left, white background". Some long ones open with "The image shows", as recaptions do."""
    article = "An" if labels.colour[0] in "aeiou" else "A"
    template = LONG_TEMPLATES[rng.integers(len(LONG_TEMPLATES))]
    long = template.format(
        a=article,
        a_lower=article.lower(),
        colour=labels.colour,
        shape=labels.shape,
        where=POSITIONS[labels.position][2],
        background=labels.background,
    )
    short = f"{labels.colour} {labels.shape}, {labels.position}, {labels.background} background"
    return long, short


def make_shapes(n: int, seed: int = 0) -> Iterator[ShapeSample]:
    """`n` samples; the same (n, seed) always gives the same samples, and sample i does not depend on n."""
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        labels = sample_labels(rng)
        long, short = captions(labels, rng)
        yield ShapeSample(render(labels), long, short, labels)


def write_shapes(out_dir: str | Path, n: int, seed: int = 0, shard_rows: int = 1000) -> list[Path]:
    """Raw shards (image PNG bytes, recaption, recaption_short, height, width, plus the label columns)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    samples = make_shapes(n, seed)
    for shard, start in enumerate(range(0, n, shard_rows)):
        rows = []
        for _ in range(min(shard_rows, n - start)):
            s = next(samples)
            rows.append(
                {
                    "image": encode_image(s.image, "png"),
                    "recaption": s.recaption,
                    "recaption_short": s.recaption_short,
                    "height": s.labels.height,
                    "width": s.labels.width,
                    **{k: v for k, v in asdict(s.labels).items() if k not in ("width", "height")},
                }
            )
        path = out_dir / f"shapes-{shard:05d}.parquet"
        write_table(path, pa.Table.from_pylist(rows))
        paths.append(path)
    return paths


@dataclass(frozen=True)
class ShapesDataset:
    raw: Path  # raw shards (make-dataset)
    phase: Path  # phase shards (create-phase)
    index: Path  # bucket index .npz (create-indices)

    @classmethod
    def under(cls, root: str | Path) -> ShapesDataset:
        """Where `prepare_shapes(root, ...)` puts each stage's output."""
        root = Path(root)
        return cls(root / "raw", root / "phase", root / "bucket_indices.npz")


def prepare_shapes(
    root: str | Path, n: int, max_res: int, seed: int = 0, *, shard_rows: int = 1000, n_proc: int = 1,
    progress: bool = False, log: Callable[[str, str], None] | None = None,
) -> ShapesDataset:
    """A trainable shapes dataset under `root` through the real make-dataset -> create-phase -> create-indices path.

    Each stage leaves a `.complete` marker with its settings and is skipped when the marker is there with the same
    settings, so an interrupted preparation picks up where it stopped. A stage made with other settings (or by an
    older version of this generator) is redone, and so is every stage after it. `log(stage, status)` reports each
    stage: "...", then its seconds, or "done already (PATH)".
    """
    import shutil

    from sd3.data.index import create_indices
    from sd3.data.phase import PhaseOptions, create_phase

    data = ShapesDataset.under(root)
    settings = {"n": n, "max_res": max_res, "seed": seed, "version": SHAPES_VERSION}
    stages = (  # (name, output, marker, run)
        ("make-dataset", data.raw, data.raw / ".complete",
         lambda: write_shapes(data.raw, n, seed=seed, shard_rows=shard_rows)),
        ("create-phase", data.phase, data.phase / ".complete",
         lambda: create_phase(data.raw, data.phase, PhaseOptions(max_res=max_res, patch_size=16), progress=progress)),
        ("create-indices", data.index, data.index.with_suffix(".complete"),
         lambda: create_indices(data.phase, data.index, n_proc)),
    )
    redo = False
    for name, output, marker, run in stages:
        if not redo and marker.exists() and {k: json.loads(marker.read_text()).get(k) for k in settings} == settings:
            if log:
                log(name, f"done already ({marker.parent})")
            continue
        if marker.exists():  # made with other settings: its output and everything after it are stale
            marker.unlink()
            redo = True
        if redo:  # (without a marker and with nothing redone before, a partial output is resumed instead)
            if output.is_dir():
                shutil.rmtree(output)
            else:
                output.unlink(missing_ok=True)
        redo = True
        if log:
            log(name, "...")
        start = time.perf_counter()
        run()
        seconds = round(time.perf_counter() - start, 1)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"seconds": seconds, **settings}))
        if log:
            log(name, f"{seconds:.0f} s")
    return data
