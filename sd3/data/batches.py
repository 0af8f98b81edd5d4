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
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from sd3.config import DataConfig
from sd3.data.captions import caption_text, choose_long, clean_caption
from sd3.data.images import BadImage, decode_image, to_array
from sd3.data.sampler import PURPOSE_CAPTIONS, SamplerBatch
from sd3.data.shards import ShardReader, ShardReadError, image_values, text_values

if TYPE_CHECKING:
    from sd3.data.latents import LatentCacheReader

SKIP_REASONS = (
    "empty_image",  # None or zero bytes
    "decode_error",  # not an image / corrupt
    "truncated",  # the file ends early
    "too_large",  # more pixels than PIL's MAX_IMAGE_PIXELS (decompression bomb)
    "too_small",  # a side below MIN_SIDE
    "size_mismatch",  # decoded size differs from the row's bucket
    "bad_caption",  # the chosen caption is None, empty, not text or not UTF-8
    "read_error",  # the row's shard or row group is damaged and cannot be read
    "not_cached",  # a sampled row missing from the cache (topology.mode=cached, or data.latent_cache)
)
SKIP_NOT_CACHED = "not_cached"
MIN_SIDE = 8  # pixels; no bucket is smaller than one patch

log = logging.getLogger(__name__)


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(SKIP_REASONS, 0)


def skip_vector(counts: dict[str, int]) -> list[int]:
    """Counts in SKIP_REASONS order (for a fixed-size tensor)."""
    return [int(counts.get(r, 0)) for r in SKIP_REASONS]


def skip_dict(vector: Sequence[int]) -> dict[str, int]:
    return {r: int(v) for r, v in zip(SKIP_REASONS, vector, strict=True)}


@dataclass
class RawBatch:
    """Decoded rows of one step, all of one bucket.

    images: (B, 3, height, width) uint8 in [0, 255] as decoded (pinned when the loader encodes on CUDA), or
    float32 in [-1, 1] (what the VAE takes; it accepts both); captions: B cleaned captions; row_ids: (B,) int64 global
    row ids; skipped: rows of this step dropped, by reason. B can be smaller than the sampler batch, even 0.
    With a latent cache (data.latent_cache) images are not decoded: images is (B, 0, H, W) and posterior holds
    the cached VAE posterior (B, 2, C, H/8, W/8), mean and std, in bf16.
    """

    images: torch.Tensor  # (B, 3, H, W), or (B, 0, H, W) with a posterior
    captions: list[str]
    row_ids: np.ndarray  # (B,)
    skipped: dict[str, int]
    step: int = -1
    seed_for_step: int = 0
    height: int = 0
    width: int = 0
    long_captions: bool = True  # which caption column this batch used
    posterior: torch.Tensor | None = None  # (B, 2, C, h, w) from data.latent_cache, else None

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


def decode_row(data: bytes | None) -> tuple[np.ndarray | None, str | None]:
    """((H, W, 3) uint8, None) for a usable image of any size, else (None, its SKIP_REASONS reason)."""
    try:
        return to_array(decode_image(data, min_side=MIN_SIDE)), None
    except BadImage as e:
        return None, e.reason


def to_channels_first(pixels: np.ndarray, pin_memory: bool = False) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) uint8, in page-locked memory with `pin_memory`.

    What a loader hands its VAE: a quarter of the bytes of float32, and pinned so the host-to-device copy is a
    DMA that does not stall the host (the VAE scales it to [-1, 1] on its device, sd3/encoders/vae.py).
    """
    images = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))  # (B, 3, H, W) uint8
    return images.pin_memory() if pin_memory else images


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    # numpy, not torch: this runs beside the encoders, and torch's intra-op threads would contend with them.
    channels_first = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))  # (B, 3, H, W) uint8
    scaled = channels_first.astype(np.float32)
    scaled /= 127.5  # exact at 0 and 255: the range is exactly [-1, 1]
    scaled -= 1.0
    return torch.from_numpy(scaled)


class RowLoader:
    """Turns SamplerBatches into RawBatches for one shard folder.

    folder: the phase shard folder; data_cfg: the [data] settings (caption probabilities, decode_threads);
    row_counts: rows per shard if known (BucketIndex.manifest["rows"]), saving a read of every footer.
    latents: a LatentCacheReader of data.latent_cache over the same folder; given, images are not read or
    decoded, the rows' cached VAE posteriors are looked up instead (sd3/data/latents.py).
    pin_memory: decoded images in page-locked memory (a loader whose VAE runs on CUDA).
    `counters` accumulates skipped rows by reason over the loader's life.
    """

    def __init__(self, folder: str | Path, data_cfg: DataConfig, row_counts: Sequence[int] | None = None,
                 latents: LatentCacheReader | None = None, pin_memory: bool = False):
        self.reader = latents.reader if latents is not None else ShardReader(folder, row_counts=row_counts)
        self.latents = latents
        self.pin_memory = pin_memory
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
        columns = [caption_column] if self.latents is not None else ["image", caption_column]
        table, readable = self._read(row_ids, columns)
        row_ids = row_ids[readable]
        skipped = empty_counts()
        skipped["read_error"] = int((~readable).sum())

        captions: list[str | None] = []
        for value in text_values(table.column(caption_column)):
            text = caption_text(value)
            if text is not None:
                text = clean_caption(text, rng, self.cfg.drop_article_prob, self.cfg.strip_punctuation_prob)
            captions.append(text)

        todo = [i for i, c in enumerate(captions) if c is not None]
        skipped["bad_caption"] = len(captions) - len(todo)
        h, w = batch.height, batch.width
        if self.latents is not None:
            return self._from_cache(batch, row_ids, captions, todo, skipped, use_long)
        images = image_values(table.column("image"))
        work = [images[i] for i in todo]
        if self._pool is not None:
            decoded = list(self._pool.map(_decode, work, [h] * len(work), [w] * len(work)))
        else:
            decoded = [_decode(data, h, w) for data in work]

        keep: list[int] = []
        pixels: list[np.ndarray] = []
        for i, d in zip(todo, decoded, strict=True):
            if d.reason is not None:
                skipped[d.reason] += 1
            else:
                keep.append(i)
                pixels.append(d.pixels)
        for reason, n in skipped.items():
            self.counters[reason] += n

        if pixels:
            images_t = to_channels_first(np.stack(pixels), self.pin_memory)  # (B, 3, H, W) uint8
        else:
            images_t = torch.empty((0, 3, h, w), dtype=torch.uint8)
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

    def _from_cache(self, batch: SamplerBatch, row_ids: np.ndarray, captions: list[str | None], todo: list[int],
                    skipped: dict[str, int], use_long: bool) -> RawBatch:
        """The rows with a caption and a cached posterior; the others counted as online decoding would count them."""
        posterior, reasons = self.latents.lookup(row_ids[todo], batch.height, batch.width)  # (B, 2, C, h, w)
        keep = [i for i, reason in zip(todo, reasons, strict=True) if reason is None]
        for reason in reasons:
            if reason is not None:
                skipped[reason] += 1
        for reason, n in skipped.items():
            self.counters[reason] += n
        return RawBatch(
            images=torch.empty((len(keep), 0, batch.height, batch.width)),
            captions=[captions[i] for i in keep],
            row_ids=row_ids[keep],
            skipped=skipped,
            step=batch.step,
            seed_for_step=batch.seed_for_step,
            height=batch.height,
            width=batch.width,
            long_captions=use_long,
            posterior=posterior,
        )
