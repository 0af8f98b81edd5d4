"""A simple colour classifier for the shapes data: which named colour is the background, which the shape.

Every pixel is snapped to the nearest colour of the shapes palette (sd3/data/synthetic.py COLOURS). The most
frequent colour is the background (a shape covers well under half of the image); the shape's colour is the most
frequent of the others. Pixels far from every palette colour (blurry edges, artefacts) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sd3.data.synthetic import COLOURS

NAMES = list(COLOURS)
PALETTE = np.array([COLOURS[n] for n in NAMES], dtype=np.float32)  # (K, 3)
MAX_DISTANCE = 80.0  # RGB distance beyond which a pixel matches no palette colour


@dataclass(frozen=True)
class Colours:
    background: str
    shape: str | None  # None when no second colour covers min_fraction of the image
    fractions: dict[str, float]  # share of the image snapped to each palette colour


def classify(image: Image.Image, min_fraction: float = 0.01) -> Colours:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 1, 3)  # (N, 1, 3)
    distance = np.linalg.norm(pixels - PALETTE[None], axis=-1)  # (N, K)
    nearest = distance.argmin(axis=1)  # (N,)
    close = distance[np.arange(len(nearest)), nearest] <= MAX_DISTANCE
    counts = np.bincount(nearest[close], minlength=len(NAMES)) / len(nearest)  # (K,)
    order = np.argsort(-counts)
    shape = NAMES[order[1]] if counts[order[1]] >= min_fraction else None
    return Colours(NAMES[order[0]], shape, {n: float(c) for n, c in zip(NAMES, counts, strict=True)})
