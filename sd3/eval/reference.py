"""The reference set of `sd3 eval`: real images and their captions, from phase/raw shards or an image folder.

A shard folder gives N rows drawn at random (seeded) with their long caption ("recaption", the short one when it is
missing); an image folder needs the metadata file `sd3 import-folder` reads (metadata.csv/.json/.jsonl with
"image" and "prompt"). Rows whose image does not decode or whose caption is empty are skipped and counted by reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sd3.data.captions import caption_text
from sd3.data.images import BadImage, decode_image
from sd3.data.import_folder import read_metadata
from sd3.data.shards import ShardReader, image_values, list_shards, text_values
from sd3.eval.fid import EvalError

METADATA_NAMES = ("metadata.jsonl", "metadata.json", "metadata.csv")


@dataclass
class Reference:
    images: list[Image.Image]  # RGB, sizes as stored
    captions: list[str]  # captions[i] describes images[i]
    skipped: Counter = field(default_factory=Counter)  # rows left out, by reason


def load_reference(path: str | Path, n: int, seed: int = 0) -> Reference:
    """Up to `n` (image, caption) pairs of a shard folder or an image folder with a metadata file."""
    path = Path(path)
    if not path.is_dir():
        raise EvalError(f"--reference {path}: not a folder of shards or images")
    if n < 1:
        raise EvalError(f"--n {n}: must be >= 1")
    if list_shards(path):
        return _from_shards(path, n, seed)
    metadata = next((path / m for m in METADATA_NAMES if (path / m).is_file()), None)
    if metadata is None:
        raise EvalError(f"--reference {path}: no .parquet shards and no {' / '.join(METADATA_NAMES)} with captions")
    return _from_folder(path, metadata, n, seed)


def _keep(ref: Reference, data: bytes | None, caption: object) -> None:
    text = caption_text(caption)
    if not text:
        ref.skipped["bad_caption"] += 1
        return
    try:
        image = decode_image(data)
    except BadImage as e:
        ref.skipped[e.reason] += 1
        return
    ref.images.append(image.convert("RGB"))
    ref.captions.append(text)


def _from_shards(folder: Path, n: int, seed: int) -> Reference:
    reader = ShardReader(folder)
    order = np.random.default_rng(seed).permutation(reader.num_rows)
    ref = Reference([], [])
    for start in range(0, len(order), max(n, 64)):  # read more only when rows were skipped
        rows = np.sort(order[start:start + max(n, 64)])
        table = reader.read(rows, ["image", "recaption", "recaption_short"])
        longs, shorts = text_values(table.column("recaption")), text_values(table.column("recaption_short"))
        for data, long, short in zip(image_values(table.column("image")), longs, shorts, strict=True):
            if len(ref.images) < n:
                _keep(ref, data, long if caption_text(long) else short)
        if len(ref.images) >= n:
            break
    return ref


def _from_folder(folder: Path, metadata: Path, n: int, seed: int) -> Reference:
    entries = read_metadata(metadata)
    ref = Reference([], [])
    for i in np.random.default_rng(seed).permutation(len(entries)):
        if len(ref.images) >= n:
            break
        file = folder / str(entries[i]["image"])
        if not file.is_file():
            ref.skipped["missing_file"] += 1
            continue
        _keep(ref, file.read_bytes(), entries[i].get("prompt"))
    return ref
