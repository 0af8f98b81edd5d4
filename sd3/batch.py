"""The unit of work a model rank consumes: one micro-batch of latents and text embeddings.

Produced by the conditioner (on a loader rank, or in-process when colocated) or read back from cached
shards; carried between ranks by sd3/dist/transport.py with its exact shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    latents: torch.Tensor  # (B, C, H/8, W/8) normalised VAE latents: (z - shift) * scale
    context: torch.Tensor  # (B, 2*T, D) [Gemma tokens | ModernBERT tokens], padded positions are zero
    pooled: torch.Tensor  # (B, P) CLIP pooled text projection
    row_ids: torch.Tensor  # (B,) int64 global row ids in the shard folder (for exactly-once accounting)

    def __len__(self) -> int:
        return int(self.row_ids.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        """Move to `device`; floating tensors are cast to `dtype` when given, row ids stay int64."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype, non_blocking=True)
            return t.to(device=device, non_blocking=True)

        return Batch(*[move(t) for t in self.tensors()])

    def split(self, n: int) -> list["Batch"]:
        """`n` consecutive slices as even as possible (some may be empty when len(self) < n)."""
        sizes = [len(self) // n + (1 if i < len(self) % n else 0) for i in range(n)]
        parts = [torch.split(t, sizes) for t in self.tensors()]
        return [Batch(*[p[i].contiguous() for p in parts]) for i in range(n)]
