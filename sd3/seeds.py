"""The one seed derivation of the project: every RNG stream is named by (seed, purpose, *ids).

Placed at the top of the package so every stage (data -> encoders -> distributed -> train -> sample) can use it
without importing a later one. A stream's seed depends only on its name — never on a global RNG or on how many
draws came before — which is what exact resume and replayed steps rely on.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

_WORD = 0xFFFFFFFF


def _words(value: int | str) -> list[int]:
    """32-bit words of one key: a string by its CRC-32, an int by its low word (and its high word if it has one,
    so 63-bit seeds made by stream_seed itself keep their entropy when fed back in)."""
    if isinstance(value, str):
        return [zlib.crc32(value.encode())]
    value = int(value) & 0x7FFFFFFFFFFFFFFF
    return [value & _WORD] + ([value >> 32] if value >> 32 else [])


def stream_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for the RNG stream named by (seed, keys...), e.g. (seed, "train", step, rank).

    numpy's SeedSequence mixes the words (a well-tested hash of arbitrary-length entropy), so streams whose
    names differ in any key are independent. 63 bits: the value fits torch.Generator.manual_seed and an int64.
    """
    words = _words(seed)
    for key in keys:
        words += _words(key)
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(seed: int, *keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `stream_seed(seed, *keys)`."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, *keys))


def numpy_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A numpy Generator seeded with `stream_seed(seed, *keys)`."""
    return np.random.default_rng(stream_seed(seed, *keys))
