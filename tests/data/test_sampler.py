"""The bucket batch sampler: deterministic, resumable, disjoint across loaders, one bucket per batch."""

import logging

import numpy as np
import pytest

from sd3.data.index import BucketIndex
from sd3.data.sampler import BucketBatchSampler, split_rows


def make_index(counts: dict[str, int], seed: int = 0) -> BucketIndex:
    """Buckets with the given sizes over shuffled global row ids (as rows of many shards would be)."""
    total = sum(counts.values())
    ids = np.random.default_rng(seed).permutation(total).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(list(counts.values()))]).astype(np.int64)
    row_ids = np.concatenate([np.sort(ids[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)])
    return BucketIndex(list(counts), row_ids, offsets, {"shards": [], "bytes": [], "rows": [total], "skipped_rows": 0})


INDEX = make_index({"64x64": 300, "32x64": 170, "64x32": 97, "48x48": 41, "80x80": 20, "16x16": 5})
BUCKET_OF = {int(r): b for b in INDEX.buckets for r in INDEX.rows(b)}


def ids(sampler, steps):
    return [sampler.batch(s).row_ids.tolist() for s in steps]


def test_same_seed_same_batches_and_other_seed_differs():
    a, b = BucketBatchSampler(INDEX, 16, seed=3), BucketBatchSampler(INDEX, 16, seed=3)
    assert ids(a, range(60)) == ids(b, range(60))
    assert ids(a, range(60)) != ids(BucketBatchSampler(INDEX, 16, seed=4), range(60))
    # batch(step) is pure: asking out of order, or again, gives the same answer
    assert ids(a, [55, 3, 40]) == ids(b, [55, 3, 40]) and a.batch(7).seed_for_step == b.batch(7).seed_for_step


def test_load_state_dict_mid_stream_continues_identically():
    first = BucketBatchSampler(INDEX, 16, seed=5)
    for _ in range(37):  # past the end of epoch 0 (about 37 batches)
        first.next()
    state = first.state_dict()
    expected = [first.next() for _ in range(20)]
    resumed = BucketBatchSampler(INDEX, 16, seed=5)
    resumed.load_state_dict(state)
    got = [resumed.next() for _ in range(20)]
    assert [b.row_ids.tolist() for b in got] == [b.row_ids.tolist() for b in expected]
    assert [b.seed_for_step for b in got] == [b.seed_for_step for b in expected]
    assert resumed.load_state_dict(state) == "exact"


def test_load_state_dict_refuses_other_seed_data_or_an_old_state():
    state = BucketBatchSampler(INDEX, 16, seed=5).state_dict()
    with pytest.raises(ValueError, match="seed"):
        BucketBatchSampler(INDEX, 16, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="version 1"):
        BucketBatchSampler(INDEX, 16, seed=5).load_state_dict({k: state[k] for k in ("step", "seed", "num_rows")})
    grown = BucketBatchSampler(make_index({"64x64": 400, "32x64": 170}), 16, seed=5)
    with pytest.raises(ValueError, match="num_rows"):
        grown.load_state_dict({**state, "step": 9})
    assert grown.load_state_dict({**state, "step": 9}, strict=False) == "restarted"  # data added on purpose
    assert grown.step == 9 and len(grown.batch(9).row_ids) == 16


def test_epoch_covers_each_row_of_the_share_once_and_never_mixes_buckets():
    s = BucketBatchSampler(INDEX, 16, seed=1)
    seen = []
    for step in range(s.batches_per_epoch):
        b = s.batch(step)
        assert {BUCKET_OF[int(r)] for r in b.row_ids} == {b.bucket}
        assert len(b.row_ids) <= 16
        assert (b.height, b.width) == tuple(int(v) for v in b.bucket.split("x"))
        seen.extend(b.row_ids.tolist())
    assert len(seen) == len(set(seen)) == s.rows_per_epoch
    kept = {b for b in INDEX.buckets if INDEX.counts[INDEX.buckets.index(b)] >= 16}
    assert s.rows_per_epoch == sum(int(INDEX.counts[INDEX.buckets.index(b)]) for b in kept)
    assert set(seen) == {r for r, b in BUCKET_OF.items() if b in kept}
    # the next epoch is another permutation of the same rows
    nxt = [r for step in range(s.batches_per_epoch, 2 * s.batches_per_epoch) for r in s.batch(step).row_ids.tolist()]
    assert sorted(nxt) == sorted(seen) and nxt != seen


@pytest.mark.parametrize("loader_rows", [(8, 8, 8), (16, 16, 8)])  # even, and 3 loaders feeding 2+2+1 ranks of 8
def test_loaders_are_disjoint_within_each_pass_and_read_one_bucket_per_step(loader_rows):
    loaders = [BucketBatchSampler(INDEX, n, seed=2, loader_index=k, num_loaders=3, loader_rows=loader_rows)
               for k, n in enumerate(loader_rows)]
    assert len({s.batches_per_epoch for s in loaders}) == 1
    per_epoch = loaders[0].batches_per_epoch
    for epoch in range(2):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        sets = [{r for step in steps for r in s.batch(step).row_ids.tolist()} for s in loaders]
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
        assert sum(len(x) for x in sets) == loaders[0].rows_per_epoch
        assert all(len({s.batch(step).bucket for s in loaders}) == 1 for step in steps)  # the same bucket per step
    full = [len(s.batch(0).row_ids) for s in loaders]
    assert full == list(loader_rows)


@pytest.mark.parametrize("n", [0, 1, 5, 17, 39, 40])
def test_split_rows_shares_a_short_chunk_in_proportion(n):
    sizes = split_rows(n, (16, 16, 8))
    assert sum(sizes) == n and all(s >= 0 for s in sizes)
    if n == 40:
        assert sizes == [16, 16, 8]
    else:
        assert all(abs(s - n * r / 40) < 1 for s, r in zip(sizes, (16, 16, 8), strict=True))


def test_first_batch_is_from_the_largest_bucket():
    for seed in range(20):  # largest = most pixels per image, whatever its number of rows
        assert BucketBatchSampler(INDEX, 16, seed=seed).batch(0).bucket == "80x80"
        assert BucketBatchSampler(INDEX, 8, seed=seed, loader_index=1, num_loaders=2).batch(0).bucket == "80x80"
    assert BucketBatchSampler(INDEX, 16, seed=0, min_bucket_size=30).batch(0).bucket == "64x64"  # 80x80 dropped
    assert BucketBatchSampler(INDEX, 8, seed=0, num_loaders=3).threshold == 24  # one global batch of all loaders


def test_bucket_frequency_follows_size():
    s = BucketBatchSampler(INDEX, 4, seed=0)
    firsts = [s.batch(e * s.batches_per_epoch + 1).bucket for e in range(300)]  # 2nd batch of 300 epochs
    share = np.array([firsts.count(b) for b in ("64x64", "32x64", "64x32", "48x48", "80x80")]) / len(firsts)
    expected = np.array([300, 170, 97, 41, 20]) / 628
    assert np.abs(share - expected).max() < 0.08


def test_small_buckets_dropped_and_logged(caplog):
    with caplog.at_level(logging.INFO, logger="sd3.data.sampler"):
        s = BucketBatchSampler(INDEX, 16, seed=0, min_bucket_size=0)
    assert "16x16" in caplog.text and "below 16 rows" in caplog.text
    assert "16x16" not in {s.batch(i).bucket for i in range(s.batches_per_epoch)}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sd3.data.sampler"):
        s = BucketBatchSampler(INDEX, 16, seed=0, min_bucket_size=50)  # explicit threshold
    assert s.threshold == 50 and "48x48" in caplog.text and "below 50 rows" in caplog.text
    assert {s.batch(i).bucket for i in range(s.batches_per_epoch)} == {"64x64", "32x64", "64x32"}
    assert "80x80" in caplog.text
    s = BucketBatchSampler(INDEX, 16, seed=0, min_bucket_size=1)
    assert "16x16" in {s.batch(i).bucket for i in range(s.batches_per_epoch)}


def test_no_bucket_big_enough_is_a_clear_error():
    with pytest.raises(ValueError, match="min_bucket_size"):
        BucketBatchSampler(INDEX, 1000, seed=0)


def test_seed_for_step_streams():
    s = BucketBatchSampler(INDEX, 16, seed=0)
    b = s.batch(3)
    assert b.seed(1) != b.seed(2)
    assert b.numpy_rng(1).random() == s.batch(3).numpy_rng(1).random()
    other_loader = BucketBatchSampler(INDEX, 16, seed=0, loader_index=1, num_loaders=2)
    assert other_loader.batch(3).seed_for_step != b.seed_for_step


def layout(rows: tuple[int, ...], seed: int = 7, index: BucketIndex = INDEX) -> list[BucketBatchSampler]:
    """One sampler per loader of a layout (rows per step of each loader)."""
    return [BucketBatchSampler(index, n, seed, k, len(rows), loader_rows=rows) for k, n in enumerate(rows)]


def read(samplers: list[BucketBatchSampler], steps: range) -> list[int]:
    return [r for step in steps for s in samplers for r in s.batch(step).row_ids.tolist()]


# (layout before, layout after): per-loader rows of a step. colocated 1 rank of 16 -> 1 loader feeding 2 ranks of 16;
# 1 loader + 2 ranks -> 2 loaders + 2 ranks; per-rank batch 16 -> 8; and an uneven 3-loader layout.
CHANGES = [((16,), (32,)), ((32,), (16, 16)), ((32,), (16,)), ((16, 16), (24, 24, 8)), ((8,), (40,))]


@pytest.mark.parametrize(("before", "after"), CHANGES)
@pytest.mark.parametrize("at", [1, 5, 13])
def test_elastic_resume_reads_every_row_of_the_epoch_once(before, after, at):
    old = layout(before)
    first = read(old, range(at))
    for s in old:
        s.step = at  # what the model ranks had consumed when the checkpoint was taken
    state = old[0].state_dict()
    assert all(s.state_dict() == state for s in old)  # one data position for all loaders
    new = layout(after)
    hows = {s.load_state_dict(state) for s in new}
    assert hows == {"exact" if before == after else "elastic"}
    epoch = old[0].epoch_of(at)
    rest = []
    step = at
    while new[0].epoch_of(step) == epoch:
        rest.extend(read(new, range(step, step + 1)))
        step += 1
    rows = first + rest
    assert len(rows) == len(set(rows)), "a row was read twice in the epoch"
    assert set(rows) == set(read(old, range(old[0].batches_per_epoch))), "a row of the epoch was never read"
    # the next epoch is a whole pass under the new layout
    assert new[0].epoch_of(step + new[0].batches_per_epoch - 1) == epoch + 1
    nxt = read(new, range(step, step + new[0].batches_per_epoch))
    assert sorted(nxt) == sorted(set(nxt)) and len(nxt) == new[0].rows_per_epoch


def test_elastic_twice_in_one_epoch_and_an_exact_resume_of_the_replanned_stream():
    a = layout((16,))
    rows = read(a, range(4))
    b = layout((32,))
    for s in b:
        s.load_state_dict(a[0].state_dict() | {"step": 4})
    rows += read(b, range(4, 7))
    state_b = b[0].state_dict() | {"step": 7}
    again = layout((32,))
    assert {s.load_state_dict(state_b) for s in again} == {"exact"}
    assert read(again, range(7, 12)) == read(b, range(7, 12))  # the re-planned stream itself resumes exactly
    c = layout((8, 8))
    for s in c:
        s.load_state_dict(state_b)
    step = 7
    while c[0].epoch_of(step) == 0:
        rows += read(c, range(step, step + 1))
        step += 1
    assert len(rows) == len(set(rows)) == a[0].rows_per_epoch


def test_state_dict_is_plain_ints_and_lists():
    state = layout((16,))[0].state_dict()
    assert all(isinstance(v, int) or (isinstance(v, list) and all(isinstance(x, (int, list)) for x in v))
               for v in state.values())
