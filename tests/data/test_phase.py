"""create-phase: sides multiples of 16, aspect kept to within a patch, height-first buckets, resumable, bad rows
counted."""

import io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sd3.cli import main
from sd3.data.buckets import area_buckets, exact_size
from sd3.data.phase import REPORT_FILE, PhaseOptions, create_phase
from sd3.data.shards import list_shards, write_table

from . import helpers


@pytest.mark.parametrize("max_res", [64, 256, 1024])
def test_exact_sizes_are_multiples_of_the_patch_and_keep_aspect(max_res):
    for height in range(17, 2000, 37):
        for width in range(17, 2000, 53):
            h, w = exact_size(height, width, max_res, 16)
            assert h % 16 == 0 and w % 16 == 0 and max(h, w) <= max_res
            scale = min(1.0, max_res / max(height, width))
            if h and w:  # each side within half a patch of the exact scaled side, so aspect within one patch
                assert abs(h - height * scale) <= 8 and abs(w - width * scale) <= 8


def test_area_buckets_are_few_and_of_about_the_target_area():
    sizes = area_buckets(256, 16)
    assert 10 <= len(sizes) <= 40
    for h, w in sizes:
        assert h % 16 == 0 and w % 16 == 0 and 0.8 * 256**2 <= h * w <= 256**2 and 0.25 <= w / h <= 4


def _raw_shard(path, sizes, extra_rows=()):
    rows = [
        {"image": helpers.solid_png(h, w), "recaption": f"A {w}x{h} image.", "recaption_short": "img"}
        for w, h in sizes  # (width, height), like PIL
    ]
    rows += list(extra_rows)
    schema = pa.schema([("image", pa.binary()), ("recaption", pa.binary()), ("recaption_short", pa.binary())])
    write_table(path, pa.Table.from_pylist(rows, schema=schema))


SIZES = [(200, 100), (100, 200), (333, 250), (64, 64), (1000, 150), (37, 500), (120, 90)]


def test_phase_output_sizes_and_bucket_names(tmp_path):
    _raw_shard(tmp_path / "raw" / "a.parquet", SIZES)
    summary = create_phase(tmp_path / "raw", tmp_path / "phase", PhaseOptions(max_res=128), workers=1, progress=False)
    assert summary.kept == len(SIZES) and not summary.dropped
    table = pq.read_table(tmp_path / "phase" / "a.parquet")
    for (w0, h0), row in zip(SIZES, table.to_pylist(), strict=True):
        img = Image.open(io.BytesIO(row["image"]))
        assert img.format == "PNG"
        w, h = img.size
        assert (row["height"], row["width"]) == (h, w)
        assert row["bucket_size"] == f"{h}x{w}"  # height first
        assert h % 16 == 0 and w % 16 == 0 and max(h, w) <= 128
        scale = min(1.0, 128 / max(w0, h0))
        assert abs(h - h0 * scale) <= 8 and abs(w - w0 * scale) <= 8  # aspect within one patch
        assert math.isclose(row["aspect_ratio"], w / h, rel_tol=1e-6)


def test_phase_drops_bad_rows_by_reason(tmp_path):
    bad = [
        {"image": helpers.truncated_png(), "recaption": b"x", "recaption_short": b"x"},
        {"image": helpers.random_bytes(), "recaption": b"x", "recaption_short": b"x"},
        {"image": b"", "recaption": b"x", "recaption_short": b"x"},
        {"image": helpers.solid_png(1, 1), "recaption": b"x", "recaption_short": b"x"},
        {"image": helpers.bomb_png(20_000, 20_000), "recaption": b"x", "recaption_short": b"x"},
        {"image": helpers.solid_png(), "recaption": None, "recaption_short": b"x"},
        {"image": helpers.solid_png(), "recaption": b"\xff\xfe", "recaption_short": b"x"},
        {"image": helpers.cmyk_jpeg(), "recaption": b"kept", "recaption_short": b"kept"},
    ]
    _raw_shard(tmp_path / "raw" / "a.parquet", [], bad)
    summary = create_phase(tmp_path / "raw", tmp_path / "phase", PhaseOptions(max_res=64), workers=1, progress=False)
    assert summary.kept == 1
    assert dict(summary.dropped) == {
        "truncated": 1, "decode_error": 1, "empty_image": 1, "too_small": 1, "too_large": 1, "bad_caption": 2
    }
    assert "dropped 7" in summary.line()


def test_phase_is_resumable_and_parallel(tmp_path):
    for k in range(3):
        _raw_shard(tmp_path / "raw" / f"s{k}.parquet", SIZES[k:])
    opt = PhaseOptions(max_res=64, fmt="webp", quality=80)
    (tmp_path / "phase").mkdir()
    (tmp_path / "phase" / ".s0.parquet.tmp-999").write_bytes(b"left by a crash")
    first = create_phase(tmp_path / "raw", tmp_path / "phase", opt, workers=2, progress=False)
    assert first.shards_written == 3
    assert first.kept + sum(first.dropped.values()) == sum(len(SIZES[k:]) for k in range(3))
    assert dict(first.dropped) == {"too_small": 3}  # 37x500 at max_res 64 is 4.7 px wide
    assert [p.name for p in list_shards(tmp_path / "phase")] == ["s0.parquet", "s1.parquet", "s2.parquet"]
    assert Image.open(io.BytesIO(pq.read_table(tmp_path / "phase" / "s1.parquet")["image"][0].as_py())).format == "WEBP"
    (tmp_path / "phase" / "s1.parquet").unlink()
    before = (tmp_path / "phase" / "s0.parquet").stat().st_mtime_ns
    again = create_phase(tmp_path / "raw", tmp_path / "phase", opt, workers=2, progress=False)
    assert again.shards_written == 1 and again.shards_skipped == 2 and again.kept == first.kept
    assert (tmp_path / "phase" / "s0.parquet").stat().st_mtime_ns == before


def test_area_mode_snaps_to_fixed_buckets(tmp_path):
    _raw_shard(tmp_path / "raw" / "a.parquet", SIZES)
    create_phase(tmp_path / "raw", tmp_path / "phase", PhaseOptions(max_res=64, bucket_mode="area"), workers=1,
                 progress=False)
    table = pq.read_table(tmp_path / "phase" / "a.parquet")
    allowed = {f"{h}x{w}" for h, w in area_buckets(64, 16)}
    assert set(table["bucket_size"].to_pylist()) <= allowed
    for (w0, h0), row in zip(SIZES, table.to_pylist(), strict=True):
        assert Image.open(io.BytesIO(row["image"])).size == (row["width"], row["height"])
        if 0.5 <= w0 / h0 <= 2:  # inside the bucket range the aspect barely moves
            assert abs(math.log(row["width"] / row["height"]) - math.log(w0 / h0)) < 0.3


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        PhaseOptions(max_res=100)
    with pytest.raises(ValueError, match="format"):
        PhaseOptions(fmt="gif")


def test_row_groups_hold_about_the_target_bytes(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    noise = [helpers.png(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))) for _ in range(24)]
    rows = [{"image": img, "recaption": b"noise", "recaption_short": b"noise"} for img in noise]
    _raw_shard(tmp_path / "raw" / "a.parquet", [], rows)
    size = len(noise[0])  # ~12 KB of incompressible PNG
    create_phase(tmp_path / "raw", tmp_path / "phase", PhaseOptions(max_res=64, row_group_bytes=6 * size),
                 progress=False)
    meta = pq.ParquetFile(tmp_path / "phase" / "a.parquet").metadata
    assert meta.num_rows == 24 and 4 <= meta.num_row_groups <= 6


def test_hugging_face_image_structs_are_read(tmp_path):
    """The source's datasets on the hub store `image` as struct<bytes, path> (datasets' Image feature)."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        {"image": {"bytes": helpers.solid_png(100, 200), "path": "a.png"}, "recaption": "A wide one.",
         "recaption_short": "wide"},
        {"image": {"bytes": None, "path": "gone.png"}, "recaption": "Missing.", "recaption_short": "missing"},
    ]
    schema = pa.schema([("image", image_type), ("recaption", pa.string()), ("recaption_short", pa.string())])
    write_table(tmp_path / "raw" / "hf.parquet", pa.Table.from_pylist(rows, schema=schema))
    summary = create_phase(tmp_path / "raw", tmp_path / "phase", PhaseOptions(max_res=64), progress=False)
    assert summary.kept == 1 and dict(summary.dropped) == {"empty_image": 1}
    assert pq.read_table(tmp_path / "phase" / "hf.parquet")["bucket_size"].to_pylist() == ["32x64"]



@pytest.mark.parametrize("workers", [1, 2])
def test_damaged_shards_are_skipped_counted_and_reported(tmp_path, workers):
    _raw_shard(tmp_path / "raw" / "a.parquet", SIZES[:2])
    (tmp_path / "raw" / "b.parquet").write_bytes(b"not parquet at all")
    no_recaption = pa.table({"image": [helpers.solid_png()], "caption": ["no recaption column"]})
    write_table(tmp_path / "raw" / "c.parquet", no_recaption)
    _raw_shard(tmp_path / "raw" / "d.parquet", SIZES[2:4])
    summary = create_phase(tmp_path / "raw", tmp_path / "phase", PhaseOptions(max_res=64), workers=workers,
                           progress=False)
    assert summary.kept == 4 and summary.shards_written == 2
    assert {name: reason for name, (reason, _) in summary.bad_shards.items()} == {
        "b.parquet": "not_parquet", "c.parquet": "missing_column"}
    assert "2 damaged shards skipped (missing_column 1, not_parquet 1" in summary.line()
    assert sorted(p.name for p in list_shards(tmp_path / "phase")) == ["a.parquet", "d.parquet"]
    report = json.loads((tmp_path / "phase" / REPORT_FILE).read_text())
    assert report["kept_rows"] == 4 and report["skipped_shards"]["c.parquet"]["reason"] == "missing_column"
    assert "recaption" in report["skipped_shards"]["c.parquet"]["detail"]


def test_cli_skips_damaged_shards_and_fails_only_when_nothing_is_usable(tmp_path, capsys):
    raw, phase = tmp_path / "raw", tmp_path / "phase"
    (raw / "z.parquet").parent.mkdir()
    (raw / "z.parquet").write_bytes(b"PAR1 truncated")
    argv = ["create-phase", "--input-dir", str(raw), "--output-dir", str(phase), "--max-res", "64", "--workers", "1",
            "--no-progress"]
    assert main(argv) == 2  # nothing usable
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable rows" in err[0] and REPORT_FILE in err[0]
    _raw_shard(raw / "a.parquet", SIZES[:3])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "kept 3 rows" in out and "1 damaged shards skipped (not_parquet 1" in out
