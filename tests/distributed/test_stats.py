"""The loader's statistics names agree with the modules that produce them."""

from sd3.data.batches import SKIP_REASONS
from sd3.distributed.stats import LOADER_STATS, TIMING_FIELDS
from sd3.encoders.conditioner import PARTS


def test_timing_fields_are_the_loaders_parts():
    # decode: the RowLoader; PARTS: the Conditioner; send / wait: the BatchSender.
    assert TIMING_FIELDS == ("decode", *PARTS, "send", "wait")
    assert LOADER_STATS.timings == TIMING_FIELDS


def test_skip_reasons_are_the_row_loaders():
    assert LOADER_STATS.skips == tuple(SKIP_REASONS)
