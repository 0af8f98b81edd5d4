"""The data commands end to end through the real CLI: make-dataset -> create-phase -> create-indices."""

import re

import numpy as np

from sd3.cli import main
from sd3.data.index import BucketIndex
from sd3.data.shards import list_shards


def test_cli_pipeline(tmp_path, capsys):
    raw, phase, index = tmp_path / "raw", tmp_path / "phase", tmp_path / "idx.npz"
    assert main(["make-dataset", "shapes", "--out", str(raw), "--n", "60", "--shard-rows", "25", "--seed", "1"]) == 0
    assert len(list_shards(raw)) == 3
    args = ["create-phase", "--input-dir", str(raw), "--output-dir", str(phase), "--max-res", "64", "--workers", "1",
            "--no-progress"]
    assert main(args) == 0
    assert "kept 60 rows, dropped 0" in capsys.readouterr().out
    assert main(args) == 0
    assert "3 already done" in capsys.readouterr().out
    assert main(["create-indices", "--data-parquet-folder", str(phase), "--bucket-indices-path", str(index),
                 "--n-proc", "2"]) == 0
    assert "60 rows" in capsys.readouterr().out
    loaded = BucketIndex.load(index, phase)
    assert np.array_equal(np.sort(loaded.row_ids), np.arange(60))


def test_cli_errors_are_one_line(tmp_path, capsys):
    index_args = ["--data-parquet-folder", str(tmp_path), "--bucket-indices-path", str(tmp_path / "i.npz")]
    assert main(["create-indices", *index_args]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"sd3 create-indices: error: .*(no .parquet shards|does not exist).*", err)
    phase_args = ["--input-dir", str(tmp_path), "--output-dir", str(tmp_path / "o"), "--max-res", "100"]
    assert main(["create-phase", *phase_args]) == 2
    assert re.fullmatch(r"sd3 create-phase: error: .*multiple of patch_size.*", capsys.readouterr().err.strip())


def test_bench_index_runs_and_both_approaches_agree(tmp_path, capsys):
    import json

    argv = ["bench", "index", "--rows", "3000", "--shards", "3", "--naive-rows", "1000", "--repeats", "1",
            "--dir", str(tmp_path)]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["agree"] is True and result["rows"] == 3000 and result["naive_rows_timed"] == 1000
    assert result["naive_extrapolated"] is True and result["buckets"] > 10
