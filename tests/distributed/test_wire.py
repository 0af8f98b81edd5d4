"""The wire header: a Batch's shapes, dtypes and the loader's statistics survive the round trip exactly."""

import ast
from pathlib import Path

import pytest
import torch

import sd3.distributed.wire as wire
from sd3.batch import Batch
from sd3.distributed.errors import LoaderFailed
from sd3.distributed.stats import LOADER_STATS, TIMING_FIELDS
from sd3.distributed.wire import (
    DATA,
    ERROR,
    FLAG_STOP_REQUESTED,
    MAGIC,
    StatsLayout,
    decode_header,
    decode_message,
    encode_header,
    encode_message,
)

LAYOUT = StatsLayout(timings=("a", "b"), skips=("x", "y", "z"))


def test_round_trip_of_shapes_dtypes_and_stats():
    batch = Batch(torch.zeros(3, 16, 12, 20), torch.zeros(3, 154, 2304, dtype=torch.bfloat16), torch.zeros(3, 768),
                  torch.arange(3))
    timings = {name: 0.5 + i for i, name in enumerate(TIMING_FIELDS)}
    skipped = {name: 7 * i for i, name in enumerate(LOADER_STATS.skips)}
    h = encode_header(LOADER_STATS, DATA, 123456, batch, timings, skipped, FLAG_STOP_REQUESTED, 7 * 2**30 + 5)
    assert h.shape == (LOADER_STATS.header_len,) and h.dtype == torch.int64
    got = decode_header(LOADER_STATS, h, peer=0)
    assert (got.kind, got.step, got.rows, got.flags) == (DATA, 123456, 3, FLAG_STOP_REQUESTED)
    assert got.peak_memory_bytes == 7 * 2**30 + 5  # the loader's peak encoder memory, exact
    assert got.specs == [(t.dtype, tuple(t.shape)) for t in batch.tensors()]
    assert got.timings == pytest.approx(timings, abs=1e-6) and got.skipped == skipped


def test_the_statistics_names_are_the_callers():
    h = encode_header(LAYOUT, DATA, 1, None, {"a": 1.5, "b": 2.0, "c": 9.0}, {"x": 1, "z": 3, "w": 8})
    assert h.shape == (LAYOUT.header_len,) and LAYOUT.header_len == LOADER_STATS.header_len - len(TIMING_FIELDS) \
        - len(LOADER_STATS.skips) + 2 + 3
    got = decode_header(LAYOUT, h, peer=0)
    assert got.timings == {"a": 1.5, "b": 2.0} and got.skipped == {"x": 1, "y": 0, "z": 3}  # unknown names drop


def test_the_wire_format_does_not_import_data_or_encoders():
    tree = ast.parse(Path(wire.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith(("sd3.data", "sd3.encoders"))}, imported


def test_empty_slice_keeps_its_shape():
    batch = Batch(torch.zeros(0, 4, 8, 6), torch.zeros(0, 10, 7), torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    got = decode_header(LAYOUT, encode_header(LAYOUT, DATA, 0, batch), peer=0)
    assert got.rows == 0 and got.specs[0] == (torch.float32, (0, 4, 8, 6))


def test_malformed_header_names_the_peer():
    h = encode_header(LAYOUT, ERROR, 5, None)
    h[0] = MAGIC - 1
    with pytest.raises(LoaderFailed, match="rank 4 sent a malformed batch header"):
        decode_header(LAYOUT, h, peer=4)


def test_message_round_trip_and_truncation():
    assert decode_message(encode_message("ValueError: bad row — ü")) == "ValueError: bad row — ü"
    assert len(decode_message(encode_message("x" * 10_000))) == 2048
