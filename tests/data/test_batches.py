"""RowLoader: bad rows are removed and counted by reason, never raised; good rows become [-1, 1] tensors."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from sd3.config import DataConfig
from sd3.data.batches import SKIP_REASONS, RowLoader, skip_dict, skip_vector
from sd3.data.index import BucketIndex
from sd3.data.sampler import BucketBatchSampler, SamplerBatch
from sd3.data.synthetic import COLOURS, SHAPES

from . import helpers

BINARY_CAPTIONS = pa.schema(
    [
        f if f.name not in ("recaption", "recaption_short") else pa.field(f.name, pa.binary())
        for f in helpers.PHASE_SCHEMA
    ]
)
# (image bytes, caption) -> expected reason (None = kept)
CASES = {
    "good": (helpers.solid_png(), b"A red square.", None),
    "truncated": (helpers.truncated_png(), b"x", "truncated"),
    "random": (helpers.random_bytes(), b"x", "decode_error"),
    "zero": (b"", b"x", "empty_image"),
    "none_image": (None, b"x", "empty_image"),
    "cmyk": (helpers.cmyk_jpeg(), b"cmyk", None),
    "palette_transparency": (helpers.palette_transparent_png(), b"palette", None),
    "16bit": (helpers.sixteen_bit_png(), b"grey", None),
    "la": (helpers.la_png(), b"la", None),
    "1x1": (helpers.solid_png(1, 1), b"x", "too_small"),
    "bomb": (helpers.bomb_png(20_000, 20_000), b"x", "too_large"),
    "wrong_size": (helpers.solid_png(48, 48), b"x", "size_mismatch"),
    "none_caption": (helpers.solid_png(), None, "bad_caption"),
    "empty_caption": (helpers.solid_png(), b"  ", "bad_caption"),
    "non_utf8_caption": (helpers.solid_png(), b"\xff\xfe caption", "bad_caption"),
}


def _batch(row_ids, height=64, width=64, seed=123, step=0):
    return SamplerBatch(step, f"{height}x{width}", height, width, np.asarray(row_ids, dtype=np.int64), seed)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    rows = [helpers.phase_row(img, caption=cap, short=cap) for img, cap, _ in CASES.values()]
    helpers.write_phase_shard(folder / "a.parquet", rows, schema=BINARY_CAPTIONS)
    # orientation 6: stored 32 wide x 64 tall, upright 64 wide x 32 tall -> bucket 32x64
    helpers.write_phase_shard(
        folder / "b.parquet",
        [helpers.phase_row(helpers.exif_rotated_jpeg(), b"rotated", b"rotated", 32, 64)],
        schema=BINARY_CAPTIONS,
    )
    return folder


@pytest.mark.parametrize("threads", [1, 3])
def test_each_bad_kind_is_skipped_and_counted(bad_folder, threads):
    loader = RowLoader(bad_folder, DataConfig(decode_threads=threads))
    raw = loader.load(_batch(range(len(CASES))))
    expected = {r: 0 for r in SKIP_REASONS}
    for _, _, reason in CASES.values():
        if reason:
            expected[reason] += 1
    assert raw.skipped == expected
    kept = [name for name, (_, _, reason) in CASES.items() if reason is None]
    assert raw.row_ids.tolist() == [list(CASES).index(n) for n in kept]
    assert raw.images.shape == (len(kept), 3, 64, 64) and raw.images.dtype == torch.uint8  # as decoded
    assert raw.images[kept.index("good"), :, 5, 5].tolist() == [200, 30, 30]
    assert len(raw.captions) == len(kept)
    white = raw.images[kept.index("palette_transparency"), :, :, 40]  # the transparent half
    assert bool((white == 255).all())
    loader.load(_batch([1, 2]))
    assert loader.counters["truncated"] == 2 and loader.counters["decode_error"] == 2
    loader.close()


def test_exif_rotated_row_is_loaded_upright(bad_folder):
    raw = RowLoader(bad_folder, DataConfig(decode_threads=1)).load(_batch([len(CASES)], height=32, width=64))
    assert raw.images.shape == (1, 3, 32, 64) and sum(raw.skipped.values()) == 0
    top_right = raw.images[0, :, :4, -4:].float()  # (3, 4, 4)
    assert top_right[0].mean() > 230 and top_right[1].mean() < 80  # red top right


def test_all_rows_bad_gives_an_empty_batch(bad_folder):
    raw = RowLoader(bad_folder, DataConfig(decode_threads=1)).load(_batch([1, 2, 3]))
    assert raw.images.shape == (0, 3, 64, 64) and raw.captions == [] and raw.row_ids.shape == (0,)


def test_caption_column_that_is_not_text(tmp_path):
    schema = pa.schema(
        [f if f.name != "recaption" else pa.field("recaption", pa.int64()) for f in helpers.PHASE_SCHEMA]
    )
    helpers.write_phase_shard(
        tmp_path / "a.parquet", [helpers.phase_row(helpers.solid_png(), caption=7)], schema=schema
    )
    raw = RowLoader(tmp_path, DataConfig(decode_threads=1, long_caption_prob=1.0)).load(_batch([0]))
    assert raw.skipped["bad_caption"] == 1 and len(raw) == 0


def test_skip_vector_round_trip():
    counts = {r: i for i, r in enumerate(SKIP_REASONS)}
    assert skip_dict(skip_vector(counts)) == counts and len(skip_vector({})) == len(SKIP_REASONS)


def test_shapes_batches_replay_and_mix_long_and_short(shapes_phase):
    index = BucketIndex.load(shapes_phase.index_path, shapes_phase.folder)
    sampler = BucketBatchSampler(index, 16, seed=0)
    loader = RowLoader(shapes_phase.folder, DataConfig(decode_threads=2), row_counts=index.manifest["rows"])
    batches = [loader.load(sampler.batch(s)) for s in range(12)]
    again = loader.load(sampler.batch(5))
    assert again.captions == batches[5].captions and torch.equal(again.images, batches[5].images)
    assert {b.long_captions for b in batches} == {True, False}
    for b in batches:
        assert b.images.shape[2:] == (b.height, b.width) and len(b) == 16
        assert sum(b.skipped.values()) == 0
        for c in b.captions:
            assert any(col in c.lower() for col in COLOURS) and any(s in c.lower() for s in SHAPES)
            assert not c.lower().startswith("the image shows")
    long_batch = next(b for b in batches if b.long_captions)
    assert any(not c.endswith(".") for c in long_batch.captions) and any(c.endswith(".") for c in long_batch.captions)


def test_damaged_shards_cost_only_their_rows(tmp_path):
    import pyarrow.parquet as pq

    rows = [helpers.phase_row(helpers.solid_png(), caption=f"row {i}") for i in range(12)]
    helpers.write_phase_shard(tmp_path / "a.parquet", rows, row_group_rows=4)  # rows 0-11, groups of 4
    helpers.write_phase_shard(tmp_path / "b.parquet", rows[:4])  # rows 12-15
    loader = RowLoader(tmp_path, DataConfig(decode_threads=1, long_caption_prob=1.0))
    # Damage the page header of row group 1 of a.parquet (rows 4-7), keeping the footer intact.
    meta = pq.ParquetFile(tmp_path / "a.parquet").metadata
    offset = meta.row_group(1).column(0).data_page_offset
    data = bytearray((tmp_path / "a.parquet").read_bytes())
    data[offset : offset + 32] = b"\xff" * 32
    (tmp_path / "a.parquet").write_bytes(bytes(data))
    # Truncate b.parquet: its footer is gone.
    (tmp_path / "b.parquet").write_bytes((tmp_path / "b.parquet").read_bytes()[:100])
    raw = loader.load(_batch([0, 5, 9, 13, 3, 6]))
    assert raw.row_ids.tolist() == [0, 9, 3]
    assert raw.skipped["read_error"] == 3 and sum(raw.skipped.values()) == 3
    assert [c.rstrip(".").lower() for c in raw.captions] == ["row 0", "row 9", "row 3"]


def test_missing_column_is_an_error_not_a_skip(tmp_path):
    from sd3.data.shards import ShardError

    schema = pa.schema([f for f in helpers.PHASE_SCHEMA if f.name != "recaption_short"])
    helpers.write_phase_shard(tmp_path / "a.parquet", [helpers.phase_row(helpers.solid_png())], schema=schema)
    with pytest.raises(ShardError, match="no column 'recaption_short'"):
        RowLoader(tmp_path, DataConfig(decode_threads=1, long_caption_prob=0.0)).load(_batch([0]))


def test_gpu_ready_images_leave_the_host_as_pinned_uint8(bad_folder, monkeypatch):
    """A loader whose VAE is on CUDA hands it page-locked uint8 (a quarter of float32's bytes, an async copy),
    and the VAE's own scaling gives exactly the latents of the float path."""
    pinned: list[torch.Size] = []

    def pin_memory(self, *args, **kwargs):  # this CPU build has no page-locked allocator: record the call
        pinned.append(self.shape)
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    raw = RowLoader(bad_folder, DataConfig(decode_threads=1), pin_memory=True).load(_batch([0, 5]))
    assert raw.images.dtype == torch.uint8 and pinned == [raw.images.shape]
    assert raw.images.element_size() * 4 == torch.float32.itemsize
    unpinned = RowLoader(bad_folder, DataConfig(decode_threads=1)).load(_batch([0, 5]))
    assert len(pinned) == 1 and torch.equal(unpinned.images, raw.images)
