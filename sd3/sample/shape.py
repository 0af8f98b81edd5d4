"""A shape classifier for the shapes data: which of SHAPES a generated image shows, by matching rendered templates.

The shape's pixels are those closer to its colour than to the background's (sd3/sample/colour.py finds both).
Each shape is then rendered by the data's own `render` (sd3/data/synthetic.py) at the image's size and at scales
around the data's range (0.4-0.5 of the short side, widened for a model that draws a little large or small),
shifted so its centroid sits on the mask's, and scored by intersection over union; the best-scoring shape wins.
Matching the generator's drawings rather than hand-written rules means a new shape needs no change here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sd3.data.synthetic import COLOURS, SHAPES, ShapeLabels, render
from sd3.sample.colour import MAX_DISTANCE, classify

SCALES = tuple(np.round(np.arange(0.30, 0.62, 0.04), 2))  # template sizes tried, as ShapeLabels.scale
MIN_PIXELS = 12  # fewer shape pixels than this: nothing recognisable was drawn


@dataclass(frozen=True)
class ShapeGuess:
    shape: str | None  # None when no shape is drawn (or no colour stands out from the background)
    iou: float  # overlap of the best template with the shape's pixels (0..1)
    scores: dict[str, float]  # best IoU of each shape


def shape_mask(image: Image.Image) -> np.ndarray:
    """(H, W) bool: the pixels of the shape, i.e. nearer its colour than the background's."""
    colours = classify(image)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    to_background = np.linalg.norm(pixels - np.float32(COLOURS[colours.background]), axis=-1)  # (H, W)
    if colours.shape is None:
        return to_background > MAX_DISTANCE
    to_shape = np.linalg.norm(pixels - np.float32(COLOURS[colours.shape]), axis=-1)  # (H, W)
    return to_shape < to_background


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """`mask` moved by (dy, dx) pixels, with what moves out dropped and what moves in empty (no wrap-around)."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def template(shape: str, width: int, height: int, scale: float) -> np.ndarray:
    """(H, W) bool: `shape` as the data renders it, centred in a width x height image."""
    labels = ShapeLabels(shape=shape, colour="red", background="white", position="center", width=width,
                         height=height, scale=scale)
    return np.asarray(render(labels), dtype=np.int16)[..., 1] < 128  # red (220, 40, 40) on white: green channel


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(ys.mean()), float(xs.mean())


def classify_shape(image: Image.Image) -> ShapeGuess:
    """The shape in `image` (a shapes-data image or one generated from a shapes caption)."""
    mask = shape_mask(image)
    if mask.sum() < MIN_PIXELS:
        return ShapeGuess(None, 0.0, {s: 0.0 for s in SHAPES})
    cy, cx = centroid(mask)
    scores = {}
    for shape in SHAPES:
        best = 0.0
        for scale in SCALES:
            t = template(shape, image.width, image.height, float(scale))
            ty, tx = centroid(t)
            t = _shift(t, round(cy - ty), round(cx - tx))
            union = np.logical_or(t, mask).sum()
            best = max(best, float(np.logical_and(t, mask).sum() / union) if union else 0.0)
        scores[shape] = best
    winner = max(scores, key=scores.get)
    return ShapeGuess(winner, scores[winner], scores)
