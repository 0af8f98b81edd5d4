"""import-folder reads DiffSynth-Studio's folder + metadata format into raw shards create-phase accepts."""

import csv
import json

import pyarrow.parquet as pq
import pytest

from sd3.data.import_folder import MetadataError, import_folder, read_metadata
from sd3.data.phase import PhaseOptions, create_phase

from . import helpers


def _folder(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "image_1.jpg").write_bytes(helpers.cmyk_jpeg(80, 120))
    (images / "sub" / "image_2.png").write_bytes(helpers.solid_png(100, 50))
    entries = [
        {"image": "image_1.jpg", "prompt": "a dog"},
        {"image": "sub/image_2.png", "prompt": "a cat, \"quoted\""},
        {"image": "missing.png", "prompt": "gone"},
        {"image": "image_1.jpg", "prompt": ""},
    ]
    return images, entries


@pytest.mark.parametrize("fmt", ["csv", "json", "jsonl"])
def test_import_then_create_phase(tmp_path, fmt):
    images, entries = _folder(tmp_path)
    meta = images / f"metadata.{fmt}"
    if fmt == "csv":
        with meta.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "prompt"])
            writer.writeheader()
            writer.writerows(entries)
    elif fmt == "json":
        meta.write_text(json.dumps(entries))
    else:
        meta.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    summary = import_folder(images, meta, tmp_path / "raw", shard_rows=1)
    assert summary.imported == 2 and summary.missing == ["missing.png"] and summary.no_prompt == 1
    assert "1 image files missing (missing.png)" in summary.line()
    assert len(summary.shards) == 2
    table = pq.read_table(summary.shards[1])
    assert table["recaption"].to_pylist() == table["recaption_short"].to_pylist() == ['a cat, "quoted"']
    result = create_phase(tmp_path / "raw", tmp_path / "phase", PhaseOptions(max_res=64), progress=False)
    assert result.kept == 2 and not result.dropped


def test_bad_metadata_names_the_file_and_line(tmp_path):
    bad = tmp_path / "metadata.jsonl"
    bad.write_text('{"image": "a.png", "prompt": "x"}\n{not json\n')
    with pytest.raises(MetadataError, match=r"metadata.jsonl:2"):
        read_metadata(bad)
    other = tmp_path / "metadata.txt"
    other.write_text("x")
    with pytest.raises(MetadataError, match="csv, .json or .jsonl"):
        read_metadata(other)
    nokey = tmp_path / "metadata.json"
    nokey.write_text(json.dumps([{"file": "a.png"}]))
    with pytest.raises(MetadataError, match="entry 1 has no 'image'"):
        read_metadata(nokey)
