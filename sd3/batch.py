"""The unit of work a model rank consumes: one micro-batch of latents and text embeddings.

Produced by the conditioner (on a loader rank, or in-process when colocated) or read back from cached
shards; carried between ranks by sd3/distributed/transport.py with its exact shapes.
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

    @classmethod
    def empty(cls, latent_shape: tuple[int, int, int], context_shape: tuple[int, int], pooled_dim: int,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Batch:
        """A batch of 0 rows with these per-row shapes, (C, h, w), (2T, D) and P: a step whose rows were all bad."""
        return cls(
            torch.empty(0, *latent_shape, dtype=dtype, device=device),  # (0, C, h, w)
            torch.empty(0, *context_shape, dtype=dtype, device=device),  # (0, 2T, D)
            torch.empty(0, pooled_dim, dtype=dtype, device=device),  # (0, P)
            torch.empty(0, dtype=torch.int64, device=device),  # (0,)
        )

    def __len__(self) -> int:
        return int(self.row_ids.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move to `device`; floating tensors are cast to `dtype` when given, row ids stay int64."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype, non_blocking=True)
            return t.to(device=device, non_blocking=True)

        return Batch(*[move(t) for t in self.tensors()])

    def split(self, n: int) -> list[Batch]:
        """`n` consecutive slices as even as possible (some may be empty when len(self) < n)."""
        sizes = [len(self) // n + (1 if i < len(self) % n else 0) for i in range(n)]
        parts = [torch.split(t, sizes) for t in self.tensors()]
        return [Batch(*[p[i].contiguous() for p in parts]) for i in range(n)]
