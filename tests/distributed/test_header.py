"""The wire header: a Batch's shapes, dtypes and the loader's statistics survive the round trip exactly."""

import pytest
import torch

from sd3.batch import Batch
from sd3.data.batches import SKIP_REASONS
from sd3.distributed.transport import (
    DATA,
    ERROR,
    FLAG_STOP_REQUESTED,
    HEADER_LEN,
    MAGIC,
    TIMING_FIELDS,
    LoaderFailed,
    decode_header,
    decode_message,
    encode_header,
    encode_message,
)


def test_round_trip_of_shapes_dtypes_and_stats():
    batch = Batch(torch.zeros(3, 16, 12, 20), torch.zeros(3, 154, 2304, dtype=torch.bfloat16), torch.zeros(3, 768),
                  torch.arange(3))
    timings = {name: 0.5 + i for i, name in enumerate(TIMING_FIELDS)}
    skipped = {name: 7 * i for i, name in enumerate(SKIP_REASONS)}
    h = encode_header(DATA, 123456, batch, timings, skipped, FLAG_STOP_REQUESTED)
    assert h.shape == (HEADER_LEN,) and h.dtype == torch.int64
    got = decode_header(h, peer=0)
    assert (got.kind, got.step, got.rows, got.flags) == (DATA, 123456, 3, FLAG_STOP_REQUESTED)
    assert got.specs == [(t.dtype, tuple(t.shape)) for t in batch.tensors()]
    assert got.timings == pytest.approx(timings, abs=1e-6) and got.skipped == skipped


def test_empty_slice_keeps_its_shape():
    batch = Batch(torch.zeros(0, 4, 8, 6), torch.zeros(0, 10, 7), torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    got = decode_header(encode_header(DATA, 0, batch), peer=0)
    assert got.rows == 0 and got.specs[0] == (torch.float32, (0, 4, 8, 6))


def test_malformed_header_names_the_peer():
    h = encode_header(ERROR, 5, None)
    h[0] = MAGIC - 1
    with pytest.raises(LoaderFailed, match="rank 4 sent a malformed batch header"):
        decode_header(h, peer=4)


def test_message_round_trip_and_truncation():
    assert decode_message(encode_message("ValueError: bad row — ü")) == "ValueError: bad row — ü"
    assert len(decode_message(encode_message("x" * 10_000))) == 2048

