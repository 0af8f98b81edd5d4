"""create-indices lists every valid row exactly once, loads without pickle, and notices a changed folder."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from sd3.data.index import BucketIndex, IndexMismatchError, create_indices
from sd3.data.shards import ShardReader, list_shards

from . import helpers


def test_every_valid_row_exactly_once(shapes_phase):
    index = BucketIndex.load(shapes_phase.index_path, shapes_phase.folder)
    assert index.num_rows == shapes_phase.num_rows
    assert sorted(index.row_ids.tolist()) == list(range(shapes_phase.num_rows))
    reader = index.reader(shapes_phase.folder)
    table = reader.read(np.arange(reader.num_rows), ["bucket_size"])
    truth = table.column("bucket_size").to_pylist()
    for name in index.buckets:
        rows = index.rows(name)
        assert (np.diff(rows) > 0).all()
        assert {truth[r] for r in rows} == {name}
    assert list(index.counts) == sorted(index.counts, reverse=True)


def test_invalid_bucket_sizes_are_left_out_and_counted(tmp_path):
    good = helpers.solid_png()
    rows = [helpers.phase_row(good) for _ in range(6)]
    rows[1]["bucket_size"] = None
    rows[4]["bucket_size"] = "garbage"
    helpers.write_phase_shard(tmp_path / "a.parquet", rows)
    helpers.write_phase_shard(tmp_path / "b.parquet", [helpers.phase_row(good, height=32) for _ in range(3)])
    index = create_indices(tmp_path, tmp_path / "idx.npz", n_proc=2)
    assert index.manifest["skipped_rows"] == 2
    assert index.buckets == ["64x64", "32x64"]
    assert index.rows("64x64").tolist() == [0, 2, 3, 5] and index.rows("32x64").tolist() == [6, 7, 8]
    assert index.manifest["rows"] == [6, 3] and index.manifest["shards"] == ["a.parquet", "b.parquet"]


def test_saved_without_pickle(shapes_phase):
    with np.load(shapes_phase.index_path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def _copy_folder(src, dst):
    dst.mkdir()
    for p in list_shards(src):
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


@pytest.mark.parametrize("change", ["added", "removed", "rewritten"])
def test_changed_folder_is_detected(shapes_phase, tmp_path, change):
    folder = _copy_folder(shapes_phase.folder, tmp_path / "phase")
    index_path = tmp_path / "idx.npz"
    create_indices(folder, index_path, n_proc=1)
    BucketIndex.load(index_path, folder)  # unchanged: fine
    shards = list_shards(folder)
    if change == "added":
        helpers.write_phase_shard(folder / "zzz-new.parquet", [helpers.phase_row(helpers.solid_png())])
        culprit = "zzz-new.parquet"
    elif change == "removed":
        shards[0].unlink()
        culprit = shards[0].name
    else:
        table = pq.read_table(shards[1])
        pq.write_table(table.slice(0, 10), shards[1])
        culprit = shards[1].name
    with pytest.raises(IndexMismatchError, match="re-run `sd3 create-indices`") as e:
        BucketIndex.load(index_path, folder)
    assert culprit in str(e.value)


def test_reader_reads_rows_in_order_across_shards(shapes_phase):
    reader = ShardReader(shapes_phase.folder)
    all_rows = reader.read(np.arange(reader.num_rows), ["recaption", "height"])
    ask = np.array([5, 310, 5, 0, 199, 80, 79])  # repeats, several shards, shard boundaries
    got = reader.read(ask, ["recaption", "height"])
    assert got.column("recaption").to_pylist() == [all_rows.column("recaption")[int(i)].as_py() for i in ask]
    assert got.column_names == ["recaption", "height"]
    with pytest.raises(IndexError, match="out of range"):
        reader.read([reader.num_rows], ["height"])


def test_reader_is_picklable_and_checks_columns(shapes_phase):
    import pickle

    reader = ShardReader(shapes_phase.folder)
    reader.read([1, 2], ["height"])
    clone = pickle.loads(pickle.dumps(reader))
    assert (
        clone.read([2], ["height"]).column("height").to_pylist()
        == reader.read([2], ["height"]).column("height").to_pylist()
    )
    with pytest.raises(ValueError, match="no column 'nope'"):
        reader.read([1], ["nope"])


def row_group_reads(folder, monkeypatch) -> list[int]:
    """A shard of 40 rows ("row i") in row groups of 8 written to folder; the row groups read from then on, in order."""
    rows = [helpers.phase_row(helpers.solid_png(), caption=f"row {i}") for i in range(40)]
    helpers.write_phase_shard(folder / "a.parquet", rows, row_group_rows=8)
    calls = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, *args, **kwargs):
        calls.append(i)
        return original(self, i, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    return calls


def test_reader_reads_only_the_needed_row_groups(tmp_path, monkeypatch):
    calls = row_group_reads(tmp_path, monkeypatch)
    got = ShardReader(tmp_path).read([17, 3, 18], ["recaption"])
    assert got.column("recaption").to_pylist() == ["row 17", "row 3", "row 18"]
    assert sorted(calls) == [0, 2]


def test_reader_keeps_decoded_row_groups_within_its_budget(tmp_path, monkeypatch):
    calls = row_group_reads(tmp_path, monkeypatch)
    reader = ShardReader(tmp_path)
    assert reader.read([17, 3], ["recaption"]).column("recaption").to_pylist() == ["row 17", "row 3"]
    assert reader.read([2, 18, 30], ["recaption"]).column("recaption").to_pylist() == ["row 2", "row 18", "row 30"]
    assert calls == [0, 2, 3]  # groups 0 and 2 came from the cache the second time
    reader.read([17], ["image"])  # other columns: another entry
    assert calls == [0, 2, 3, 2]

    shard = pq.ParquetFile(tmp_path / "a.parquet")
    one_group = max(shard.read_row_group(g, columns=["recaption"]).nbytes for g in (0, 1))
    small = ShardReader(tmp_path, cache_bytes=one_group)  # room for one row group: the least recent goes
    calls.clear()
    for row in (0, 8, 9, 0):  # groups 0, 1, 1 (kept), 0 (dropped for 1)
        small.read([row], ["recaption"])
    assert calls == [0, 1, 0] and small._group_bytes <= one_group
    none = ShardReader(tmp_path, cache_bytes=0)
    calls.clear()
    for row in (0, 1):
        none.read([row], ["recaption"])
    assert calls == [0, 0]


def test_raw_folder_without_bucket_size_is_named(shapes_phase):
    from sd3.data.shards import ShardError

    with pytest.raises(ShardError, match=r"shapes-00000.parquet: no column 'bucket_size'"):
        create_indices(shapes_phase.raw_folder, None, n_proc=1)


def test_reader_keeps_at_most_max_open_files(shapes_phase):
    reader = ShardReader(shapes_phase.folder, max_open_files=2)
    expected = reader.read(np.arange(reader.num_rows), ["recaption"]).column("recaption").to_pylist()
    ids = np.array([0, 100, 200, 300, 10, 250])  # shards 0, 1, 2, 3, 0, 3
    got = reader.read(ids, ["recaption"]).column("recaption").to_pylist()
    assert got == [expected[i] for i in ids] and len(reader._files) == 2
