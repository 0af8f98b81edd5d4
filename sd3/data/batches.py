"""Sampler batch -> RawBatch: read the rows, decode the images, pick and clean the captions, skip bad rows.

Every bad row is removed and counted under one of SKIP_REASONS; nothing here raises for a bad row, so a loader
rank never dies on data. SKIP_REASONS is a fixed tuple so the counts travel between ranks as a fixed-size
int vector (`skip_vector` / `skip_dict`).

A decoded image whose size is not its bucket's is skipped as `size_mismatch` rather than resized: create-phase
wrote every image at its bucket size, so a mismatch means a shard was edited or not made by create-phase, and
resizing would silently distort its aspect ratio.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from sd3.config import DataConfig
from sd3.data.captions import caption_text, choose_long, clean_caption
from sd3.data.images import BadImage, decode_image, to_array
from sd3.data.sampler import PURPOSE_CAPTIONS, SamplerBatch
from sd3.data.shards import ShardReader, ShardReadError, image_values, text_values

SKIP_REASONS = (
    "empty_image",  # None or zero bytes
    "decode_error",  # not an image / corrupt
    "truncated",  # the file ends early
    "too_large",  # more pixels than PIL's MAX_IMAGE_PIXELS (decompression bomb)
    "too_small",  # a side below MIN_SIDE
    "size_mismatch",  # decoded size differs from the row's bucket
    "bad_caption",  # the chosen caption is None, empty, not text or not UTF-8
    "read_error",  # the row's shard or row group is damaged and cannot be read
)
MIN_SIDE = 8  # pixels; no bucket is smaller than one patch

log = logging.getLogger(__name__)


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(SKIP_REASONS, 0)


def skip_vector(counts: dict[str, int]) -> list[int]:
    """Counts in SKIP_REASONS order (for a fixed-size tensor)."""
    return [int(counts.get(r, 0)) for r in SKIP_REASONS]


def skip_dict(vector: Sequence[int]) -> dict[str, int]:
    return {r: int(v) for r, v in zip(SKIP_REASONS, vector)}


@dataclass
class RawBatch:
    """Decoded rows of one step, all of one bucket.

    images: (B, 3, height, width) float32 in [-1, 1]; captions: B cleaned captions; row_ids: (B,) int64 global
    row ids; skipped: rows of this step dropped, by reason. B can be smaller than the sampler batch, even 0.
    """

    images: torch.Tensor  # (B, 3, H, W)
    captions: list[str]
    row_ids: np.ndarray  # (B,)
    skipped: dict[str, int]
    step: int = -1
    seed_for_step: int = 0
    height: int = 0
    width: int = 0
    long_captions: bool = True  # which caption column this batch used

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class _Decoded:
    pixels: np.ndarray | None = None  # (H, W, 3) uint8
    reason: str | None = None


def _decode(data: bytes | None, height: int, width: int) -> _Decoded:
    try:
        img = decode_image(data, min_side=MIN_SIDE)
    except BadImage as e:
        return _Decoded(reason=e.reason)
    if img.size != (width, height):  # PIL sizes are (width, height)
        return _Decoded(reason="size_mismatch")
    return _Decoded(pixels=to_array(img))


class RowLoader:
    """Turns SamplerBatches into RawBatches for one shard folder.

    folder: the phase shard folder; data_cfg: the [data] settings (caption probabilities, decode_threads);
    row_counts: rows per shard if known (BucketIndex.manifest["rows"]), saving a read of every footer.
    `counters` accumulates skipped rows by reason over the loader's life.
    """

    def __init__(self, folder: str | Path, data_cfg: DataConfig, row_counts: Sequence[int] | None = None):
        self.reader = ShardReader(folder, row_counts=row_counts)
        self.cfg = data_cfg
        self.counters = empty_counts()
        self._pool = ThreadPoolExecutor(data_cfg.decode_threads) if data_cfg.decode_threads > 1 else None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> RowLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, row_ids: np.ndarray, columns: list[str]) -> tuple[pa.Table, np.ndarray]:
        """The rows that can be read, and a mask over row_ids of which they are. A damaged shard costs its rows
        (found one by one, only when a batch hits it); a missing column or a changed folder still raises."""
        try:
            return self.reader.read(row_ids, columns), np.ones(len(row_ids), dtype=bool)
        except ShardReadError as e:
            log.warning("loader: %s; skipping the rows that cannot be read", e)
        readable = np.zeros(len(row_ids), dtype=bool)
        pieces = []
        for i, row in enumerate(row_ids):
            try:
                pieces.append(self.reader.read([row], columns))
                readable[i] = True
            except ShardReadError:
                pass
        if not pieces:
            return pa.table({c: pa.array([], pa.binary()) for c in columns}), readable
        return pa.concat_tables(pieces, promote_options="permissive"), readable

    def load(self, batch: SamplerBatch) -> RawBatch:
        """Read, decode and caption the rows of one sampler step. Never raises for a bad row."""
        rng = batch.numpy_rng(PURPOSE_CAPTIONS)
        use_long = choose_long(rng, self.cfg.long_caption_prob)
        caption_column = "recaption" if use_long else "recaption_short"
        row_ids = np.asarray(batch.row_ids, dtype=np.int64)
        table, readable = self._read(row_ids, ["image", caption_column])
        row_ids = row_ids[readable]
        skipped = empty_counts()
        skipped["read_error"] = int((~readable).sum())

        captions: list[str | None] = []
        for value in text_values(table.column(caption_column)):
            text = caption_text(value)
            if text is not None:
                text = clean_caption(text, rng, self.cfg.drop_article_prob, self.cfg.strip_punctuation_prob)
            captions.append(text)

        images = image_values(table.column("image"))
        todo = [i for i, c in enumerate(captions) if c is not None]
        skipped["bad_caption"] = len(captions) - len(todo)
        work = [images[i] for i in todo]
        h, w = batch.height, batch.width
        if self._pool is not None:
            decoded = list(self._pool.map(_decode, work, [h] * len(work), [w] * len(work)))
        else:
            decoded = [_decode(data, h, w) for data in work]

        keep: list[int] = []
        pixels: list[np.ndarray] = []
        for i, d in zip(todo, decoded):
            if d.reason is not None:
                skipped[d.reason] += 1
            else:
                keep.append(i)
                pixels.append(d.pixels)
        for reason, n in skipped.items():
            self.counters[reason] += n

        if pixels:
            # numpy, not torch: this runs beside the encoders, and torch's intra-op threads would contend with them.
            channels_first = np.ascontiguousarray(np.stack(pixels).transpose(0, 3, 1, 2))  # (B, 3, H, W) uint8
            scaled = channels_first.astype(np.float32)
            scaled /= 127.5  # exact at 0 and 255: the range is exactly [-1, 1]
            scaled -= 1.0
            images_t = torch.from_numpy(scaled)  # (B, 3, H, W) in [-1, 1]
        else:
            images_t = torch.empty((0, 3, h, w), dtype=torch.float32)
        return RawBatch(
            images=images_t,
            captions=[captions[i] for i in keep],
            row_ids=row_ids[keep],
            skipped=skipped,
            step=batch.step,
            seed_for_step=batch.seed_for_step,
            height=h,
            width=w,
            long_captions=use_long,
        )
