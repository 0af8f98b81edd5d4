"""The VAE posterior cache of hybrid mode (`data.latent_cache`, written by `sd3 cache --only vae`).

The VAE is a fixed function of the image, so its posterior — mean and std of the latent Gaussian — is computed once
per image; training reads it and draws the latent with the step's generator (sd3.encoders.vae.LatentVAE.sample), the
same distribution as online encoding. Captions stay online (long/short choice, cleaning, the text encoders), which
was the source's reason for encoding online: only the image set has to be cached.

Layout of a latent cache folder (one file per data shard, keyed by the shard's file name and row within it, so adding
shards only needs the new shards cached: `sd3 cache --only vae` skips every shard whose file is complete):

    manifest.json                   the VAE it came from: latent_channels, downsample, shift, scale, dtype
    <shard stem>.safetensors        mean.<H>x<W> / std.<H>x<W> (n, C, H/8, W/8) bf16 and rows.<H>x<W> (n,) int64:
                                    the shard's images of decoded size H x W; bad_rows (m,) / bad_reasons (m,) int64:
                                    rows whose image could not be used, with their SKIP_REASONS index

Per image that is 2 x C x (H/8) x (W/8) x 2 bytes for C = 16 (FLUX.1): 64 KiB at 256 px, 256 KiB at 512, 1 MiB at 1024.
A sampled row whose shard or row is not in the cache is skipped as `not_cached`; a row whose image was bad at cache
time is skipped with the reason it had then (the same count online decoding gives); a row cached at another size
than its bucket's is `size_mismatch`, as online.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd3.data.batches import SKIP_NOT_CACHED, SKIP_REASONS, decode_row, to_unit_range
from sd3.data.shards import ShardReader, image_values

MANIFEST = "manifest.json"
LATENT_CACHE_VERSION = 1
CACHE_DTYPE = torch.bfloat16


def shard_file(shard: Path) -> str:
    return f"{shard.stem}.safetensors"


def size_key(height: int, width: int) -> str:
    return f"{height}x{width}"


def vae_facts(vae) -> dict:
    """What a cache must agree on with the VAE that samples from it (a LatentVAE)."""
    return {"latent_channels": vae.latent_channels, "downsample": vae.downsample, "shift": vae.shift,
            "scale": vae.scale}


class LatentCacheWriter:
    """`write_all(vae)` caches every shard of `reader`'s folder not yet in `folder`; returns shards written.

    Shards are independent files, so processes share them out without talking: process `rank` of `world` takes
    the shards k with k % world == rank (`sd3 cache --only vae` under torchrun, a GPU each)."""

    def __init__(self, folder: str | Path, reader: ShardReader, rows_per_read: int = 64):
        self.folder = Path(folder)
        self.reader = reader
        self.rows_per_read = rows_per_read

    def done(self, k: int) -> bool:
        path = self.folder / shard_file(self.reader.paths[k])
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("rows") == str(int(self.reader.row_counts[k]))

    def write_all(self, vae, progress: bool = False, rank: int = 0, world: int = 1) -> list[str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = {"version": LATENT_CACHE_VERSION, "dtype": "bf16", **vae_facts(vae)}
        manifest_path = self.folder / MANIFEST
        if manifest_path.is_file():
            old = json.loads(manifest_path.read_text())
            if old != manifest:
                raise ValueError(f"latent cache {self.folder} was written by another VAE ({old}); use a new folder")
        else:  # every process writes the same manifest: atomically, so a reader never sees half of one
            tmp = manifest_path.with_name(f".{MANIFEST}.{rank}.tmp")
            tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
            os.replace(tmp, manifest_path)
        written = []
        for k in range(rank, len(self.reader.paths), world):
            if not self.done(k):
                self.write_shard(k, vae)
                written.append(self.reader.paths[k].name)
                if progress:
                    print(f"sd3 cache: cached {self.reader.paths[k].name}", flush=True)
        return written

    def _decoded(self, k: int) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
        """(row within the shard, (H, W, 3) uint8 or None, reason) for every row of shard k."""
        start, count = int(self.reader.offsets[k]), int(self.reader.row_counts[k])
        for first in range(0, count, self.rows_per_read):
            ids = np.arange(start + first, start + min(count, first + self.rows_per_read))
            table = self.reader.read(ids, ["image"])
            for i, value in enumerate(image_values(table.column("image"))):
                pixels, reason = decode_row(value)
                yield first + i, pixels, reason

    def write_shard(self, k: int, vae) -> None:
        groups: dict[str, list[tuple[int, np.ndarray]]] = {}
        moments: dict[str, list[torch.Tensor]] = {}
        bad_rows, bad_reasons = [], []

        def flush(key: str) -> None:
            rows = groups.pop(key, [])
            if rows:
                images = to_unit_range(np.stack([p for _, p in rows]))  # (n, 3, H, W) in [-1, 1]
                mean, std = vae.moments(images)  # (n, C, h, w) x 2
                moments.setdefault(f"mean.{key}", []).append(mean.to(CACHE_DTYPE).cpu())
                moments.setdefault(f"std.{key}", []).append(std.to(CACHE_DTYPE).cpu())
                moments.setdefault(f"rows.{key}", []).append(torch.tensor([r for r, _ in rows], dtype=torch.int64))

        for row, pixels, reason in self._decoded(k):
            if pixels is None:
                bad_rows.append(row)
                bad_reasons.append(SKIP_REASONS.index(reason))
                continue
            key = size_key(*pixels.shape[:2])
            groups.setdefault(key, []).append((row, pixels))
            if len(groups[key]) >= self.rows_per_read:
                flush(key)
        for key in list(groups):
            flush(key)
        tensors = {name: torch.cat(parts).contiguous() for name, parts in moments.items()}
        tensors["bad_rows"] = torch.tensor(bad_rows, dtype=torch.int64)
        tensors["bad_reasons"] = torch.tensor(bad_reasons, dtype=torch.int64)
        path = self.folder / shard_file(self.reader.paths[k])
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"rows": str(int(self.reader.row_counts[k]))})
        os.replace(tmp, path)  # a complete file or none: an interrupted run redoes this shard only


class LatentCacheReader:
    """Posteriors of rows by global row id, for the shards of `reader` (the data folder's ShardReader)."""

    def __init__(self, folder: str | Path, reader: ShardReader):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"latent cache {self.folder} has no {MANIFEST}: run `sd3 cache --only vae` first")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("version") != LATENT_CACHE_VERSION:
            raise ValueError(f"latent cache {self.folder}: format {self.manifest.get('version')}, expected "
                             f"{LATENT_CACHE_VERSION}; re-run `sd3 cache --only vae` into a new folder")
        self.reader = reader
        self._shards: dict[int, tuple | None] = {}  # shard -> (open file, {size: (sorted rows, order)}, bad map)

    def check_vae(self, vae) -> None:
        """The cache must come from a VAE like this run's (channels, downsampling, normalisation); name the key."""
        for key, value in vae_facts(vae).items():
            if self.manifest.get(key) != value:
                raise ValueError(f"latent cache {self.folder}: {key} is {self.manifest.get(key)!r} but encoders.vae "
                                 f"gives {value!r}; cache with this VAE")

    def _shard(self, k: int) -> tuple | None:
        if k not in self._shards:
            path = self.folder / shard_file(self.reader.paths[k])
            entry = None
            if path.is_file():
                f = safe_open(str(path), framework="pt")
                if (f.metadata() or {}).get("rows") == str(int(self.reader.row_counts[k])):
                    sizes = {name[5:]: f.get_tensor(name).numpy() for name in f.keys() if name.startswith("rows.")}
                    bad = dict(zip(f.get_tensor("bad_rows").tolist(), f.get_tensor("bad_reasons").tolist(),
                                   strict=True))
                    entry = (f, sizes, bad)
            self._shards[k] = entry
        return self._shards[k]

    def lookup(self, row_ids: np.ndarray, height: int,
               width: int) -> tuple[torch.Tensor, list[str | None]]:
        """(posteriors (n, 2, C, h, w) bf16 of the rows found, in order; per row None = found, else a skip reason)."""
        key = size_key(height, width)
        shard_of, local = self.reader.locate(np.asarray(row_ids, dtype=np.int64))
        found, reasons = [], []
        for k, row in zip(shard_of.tolist(), local.tolist(), strict=True):
            entry = self._shard(k)
            if entry is None:
                reasons.append(SKIP_NOT_CACHED)
                continue
            f, sizes, bad = entry
            if row in bad:
                reasons.append(SKIP_REASONS[bad[row]])
                continue
            rows = sizes.get(key)
            at = int(np.searchsorted(rows, row)) if rows is not None else 0
            if rows is None or at >= len(rows) or rows[at] != row:
                cached_elsewhere = any(row in r for r in sizes.values())
                reasons.append("size_mismatch" if cached_elsewhere else SKIP_NOT_CACHED)
                continue
            mean = f.get_slice(f"mean.{key}")[at:at + 1]  # (1, C, h, w)
            std = f.get_slice(f"std.{key}")[at:at + 1]
            found.append(torch.stack([mean[0], std[0]]))  # (2, C, h, w)
            reasons.append(None)
        c, f_ = self.manifest["latent_channels"], self.manifest["downsample"]
        empty = torch.empty(0, 2, c, height // f_, width // f_, dtype=CACHE_DTYPE)
        return (torch.stack(found) if found else empty), reasons
