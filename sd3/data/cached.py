"""The cache of `topology.mode = cached`: latents and text embeddings computed once by `sd3 cache`.

SD3's paper (and DiffSynth-Studio's two-stage training) precompute the VAE latents and text embeddings so
training reads tensors instead of running encoders. Layout of a cache folder:

    manifest.json                     what was cached: data folder, index size, sampler settings, shapes, dtype
    L000-S00000000.safetensors        one file per (loader index, sampler step) of epoch 0:
                                      latents (B, C, h, w), context (B, 2T, D), pooled (B, P), row_ids (B,)
    rows.npz                          row id -> (file, position), sorted by row id, for lookups by row

Why per sampler step: the cache run walks exactly the batches a colocated run's first epoch would see and
encodes each one with the generator seeded by that step's seed_for_step (the caption choice and the VAE
posterior sample), so a cached run reproduces a colocated run's epoch 0 bit for bit (on the same device
and CPU thread count — `sd3 cache` applies train.num_threads — since kernels' last bits depend on both).
Later epochs draw other row combinations; their rows are looked up by id and keep the caption and VAE sample of
their epoch-0 encoding — the one fixed encoding per image that precomputing implies.

Files are written under a temporary name and renamed, so an interrupted `sd3 cache` resumes where it stopped;
rows.npz and manifest.json are written last and mark the cache complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sd3.batch import Batch
from sd3.data.batches import SKIP_NOT_CACHED

MANIFEST = "manifest.json"
ROWS = "rows.npz"
CACHE_VERSION = 1


def step_file(loader_index: int, step: int) -> str:
    return f"L{loader_index:03d}-S{step:08d}.safetensors"


class CacheWriter:
    """Writes one safetensors file per sampler step; `finish()` writes the row map and the manifest."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def has(self, loader_index: int, step: int) -> bool:
        return (self.folder / step_file(loader_index, step)).is_file()

    def write(self, loader_index: int, step: int, bucket: str, batch: Batch) -> None:
        path = self.folder / step_file(loader_index, step)
        tmp = path.with_name(f".{path.name}.tmp")
        tensors = {
            "latents": batch.latents.contiguous().cpu(),  # (B, C, h, w)
            "context": batch.context.contiguous().cpu(),  # (B, 2T, D)
            "pooled": batch.pooled.contiguous().cpu(),  # (B, P)
            "row_ids": batch.row_ids.to(torch.int64).contiguous().cpu(),  # (B,)
        }
        save_file(tensors, str(tmp), metadata={"bucket": bucket, "loader_index": str(loader_index), "step": str(step)})
        os.replace(tmp, path)

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Index every step file by row id and write rows.npz + manifest.json. Returns the manifest written."""
        files = sorted(p.name for p in self.folder.glob("L*-S*.safetensors"))
        ids, file_of, pos_of = [], [], []
        for k, name in enumerate(files):
            with safe_open(str(self.folder / name), framework="pt") as f:
                rows = f.get_tensor("row_ids").numpy()  # (B,)
            ids.append(rows)
            file_of.append(np.full(len(rows), k, dtype=np.int32))
            pos_of.append(np.arange(len(rows), dtype=np.int32))
        row_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        order = np.argsort(row_ids, kind="stable")
        row_ids = row_ids[order]
        duplicates = row_ids[1:][row_ids[1:] == row_ids[:-1]]
        if len(duplicates):
            raise ValueError(f"cache {self.folder}: row {int(duplicates[0])} is cached twice (mixed sampler settings?)")
        tmp = self.folder / ".rows.tmp.npz"
        np.savez(
            tmp, row_ids=row_ids,
            file_index=(np.concatenate(file_of) if ids else np.zeros(0, np.int32))[order],
            pos=(np.concatenate(pos_of) if ids else np.zeros(0, np.int32))[order],
            files=np.array(files, dtype=np.str_),
        )
        os.replace(tmp, self.folder / ROWS)
        manifest = {"version": CACHE_VERSION, "rows_cached": int(len(row_ids)), "files": len(files), **manifest}
        tmp_manifest = self.folder / f".{MANIFEST}.tmp"
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp_manifest, self.folder / MANIFEST)
        return manifest


class CacheReader:
    """Looks rows up by id in a finished cache. `skipped` counts sampled rows that are not in it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file() or not (self.folder / ROWS).is_file():
            raise FileNotFoundError(f"cache {self.folder} is missing or incomplete: run `sd3 cache` first")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("version") != CACHE_VERSION:
            raise ValueError(f"cache {self.folder}: format {self.manifest.get('version')}, expected {CACHE_VERSION}; "
                             "re-run `sd3 cache`")
        with np.load(self.folder / ROWS, allow_pickle=False) as z:
            self.row_ids = z["row_ids"]
            self.file_of = z["file_index"]
            self.pos_of = z["pos"]
            self.files = [str(f) for f in z["files"]]
        self.skipped = {SKIP_NOT_CACHED: 0}

    def check_compatible(self, cfg, index) -> None:
        """The cache must describe this run's data and model widths; name the first key that differs."""
        m = self.manifest
        expected = {
            "index_rows": index.num_rows,
            "buckets": list(index.buckets),
            "text_tokens": cfg.model.text_tokens,
            "context_dim": cfg.model.context_dim,
            "pooled_dim": cfg.model.pooled_dim,
            "in_channels": cfg.model.in_channels,
        }
        for key, value in expected.items():
            if m.get(key) != value:
                raise ValueError(
                    f"cache {self.folder}: {key} is {m.get(key)!r} but this run has {value!r}; re-run `sd3 cache`"
                )

    def read(self, row_ids: np.ndarray) -> Batch | None:
        """The cached rows `row_ids` (in that order, missing ones dropped and counted); None if none is cached."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        at = np.searchsorted(self.row_ids, row_ids)
        found = (at < len(self.row_ids)) & (self.row_ids[np.minimum(at, len(self.row_ids) - 1)] == row_ids)
        self.skipped[SKIP_NOT_CACHED] += int((~found).sum())
        at = at[found]
        if len(at) == 0:
            return None
        files, positions = self.file_of[at], self.pos_of[at]
        parts: dict[str, list[torch.Tensor]] = {"latents": [], "context": [], "pooled": [], "row_ids": []}
        order: list[np.ndarray] = []
        for k in np.unique(files):
            where = np.flatnonzero(files == k)
            pos = torch.as_tensor(positions[where], dtype=torch.int64)
            with safe_open(str(self.folder / self.files[int(k)]), framework="pt") as f:
                for name in parts:
                    parts[name].append(f.get_tensor(name).index_select(0, pos))
            order.append(where)
        # Back to the sampler's order: files were visited one by one.
        inverse = torch.as_tensor(np.argsort(np.concatenate(order), kind="stable"), dtype=torch.int64)
        names = ("latents", "context", "pooled", "row_ids")
        return Batch(*[torch.cat(parts[name]).index_select(0, inverse) for name in names])

    def close(self) -> None:
        pass
