"""`sd3 recaption` (sd3/data/recaption.py, caption_rules.py, captioners.py): the source's drop rules on planted
outputs, columns / counts / resume with planted captioners, and the real command with the tiny LLaVA-NeXT and Llama
that `make_tiny` writes (their output is gibberish: only its shape is checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sd3.data.caption_rules import EMPTY, REPETITIVE, SHORT_FAILED, TOO_FEW_WORDS, clean, failure, strip_openings
from sd3.data.recaption import my_shards, recaption_shards
from sd3.data.synthetic import write_shapes

ROOT = Path(__file__).resolve().parents[2]


def test_openings_are_stripped_and_the_caption_capitalised():
    assert strip_openings("The image shows a red circle on white.") == "A red circle on white."
    assert strip_openings("In this artwork, a blue star glows.") == "Artwork of a blue star glows."
    assert strip_openings("  this image depicts the image shows two squares") == "Two squares"
    assert strip_openings("a plain caption") == "A plain caption"


def test_failed_captions_by_reason():
    filler = "A square with no text, no text, no text and other objects, other objects, alt-text hint."
    assert failure(filler) == REPETITIVE  # 6 filler phrases > 5
    assert failure("A square with no text and other objects on a white background.") is None  # 2 are fine
    assert failure("circle circle circle") == TOO_FEW_WORDS  # 1 unique word
    assert failure("   ") == EMPTY and failure(None) == EMPTY
    assert clean("The image shows a green triangle at the top") == ("A green triangle at the top", None)
    assert clean("red red") == (None, TOO_FEW_WORDS)


def planted_captioner(calls: list[int]):
    """Captions by the row's hint, so the test knows which rows fail and why."""

    def caption(images, hints):
        calls.append(len(images))
        out = []
        for image, hint in zip(images, hints, strict=True):
            assert image.mode == "RGB" and hint  # every row gets its image and the shapes caption as hint
            n = len(out) + sum(calls[:-1])
            if n % 5 == 1:
                out.append("A square with no text, no text, no text, no text, no text, no text")  # repetitive
            elif n % 5 == 3:
                out.append("shape shape")  # too few words
            else:
                out.append(f"The image shows {hint}")
        return out

    return caption


def planted_shortener(captions):
    return ["" if "purple" in c.lower() else c.split(",")[0][:60] for c in captions]  # purple: a failed summary


def test_columns_counts_and_resume_with_planted_models(tmp_path):
    raw = tmp_path / "raw"
    write_shapes(raw, 23, seed=3, shard_rows=10)  # 3 shards: 10, 10, 3 rows
    shards = my_shards(raw, 0, 1)
    assert [s.name for s in shards] == sorted(p.name for p in raw.glob("*.parquet")) and len(shards) == 3
    hints = [h for s in shards for h in pq.read_table(s).column("recaption").to_pylist()]
    purple = sum("purple" in h.lower() for i, h in enumerate(hints) if i % 5 in (0, 2, 4))

    calls: list[int] = []
    out = tmp_path / "out"
    summary = recaption_shards(shards, out, planted_captioner(calls), planted_shortener, batch_size=4,
                               progress=False)
    assert calls == [4, 4, 2, 4, 4, 2, 3]  # batches of 4 within each shard
    expected_dropped = {REPETITIVE: sum(i % 5 == 1 for i in range(23)),
                        TOO_FEW_WORDS: sum(i % 5 == 3 for i in range(23))}
    if purple:
        expected_dropped[SHORT_FAILED] = purple
    assert summary.dropped == expected_dropped
    assert summary.rows_in == 23 and summary.rows_out == 23 - sum(expected_dropped.values())
    assert summary.shards_done == 3

    tables = [pq.read_table(out / s.name) for s in shards]
    assert sum(t.num_rows for t in tables) == summary.rows_out
    for t in tables:
        assert {"image", "recaption", "recaption_short", "alt_text"} <= set(t.column_names)
        for long, alt in zip(t.column("recaption").to_pylist(), t.column("alt_text").to_pylist(), strict=True):
            assert long == strip_openings(f"The image shows {alt}")  # the planted opening stripped, capitalised
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary file

    # Resume: done shards are skipped; a removed output is redone; a stray temporary file does not count as done.
    (out / shards[1].name).unlink()
    (out / f".{shards[1].name}.tmp-123").write_bytes(b"half")
    calls.clear()
    again = recaption_shards(shards, out, planted_captioner(calls), planted_shortener, batch_size=4, progress=False)
    assert again.skipped_shards == {"done": 2} and again.shards_done == 1 and again.rows_in == 10
    assert calls == [4, 4, 2]


def test_shards_split_by_rank(tmp_path):
    write_shapes(tmp_path, 50, seed=0, shard_rows=10)  # 5 shards
    split = [my_shards(tmp_path, r, 2) for r in range(2)]
    assert [len(s) for s in split] == [3, 2] and not set(split[0]) & set(split[1])
    assert sorted(split[0] + split[1]) == my_shards(tmp_path, 0, 1)


def test_recaption_command_with_the_tiny_models(tiny_models, tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    write_shapes(raw, 6, seed=1, shard_rows=3)
    cmd = [sys.executable, "-m", "sd3", "recaption", "--input-dir", str(raw), "--output-dir", str(out),
           "--captioner", str(tiny_models.root / "llava-next"), "--shortener", str(tiny_models.root / "llama"),
           "--batch-size", "2", "--max-new-tokens", "12", "--short-max-new-tokens", "8", "--captioner-dtype", "fp32",
           "--shortener-dtype", "fp32", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rows_in"] == 6 and report["shards_done"] == 2
    assert report["rows_out"] + sum(report["dropped"].values()) == 6
    assert json.loads((out / "recaption_report.rank0.json").read_text())["rows_in"] == 6
    for shard in sorted(raw.glob("*.parquet")):
        table = pq.read_table(out / shard.name)
        assert {"recaption", "recaption_short", "alt_text"} <= set(table.column_names)
        assert all(isinstance(c, str) and c for c in table.column("recaption").to_pylist())

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["skipped_shards"] == {"done": 2}


@pytest.mark.parametrize("extra,culprit", [
    (["--input-dir", "/no/such/dir"], "--input-dir /no/such/dir is not a folder"),
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
])
def test_recaption_bad_arguments_are_one_line_exit_2(tmp_path, extra, culprit):
    cmd = [sys.executable, "-m", "sd3", "recaption", "--input-dir", str(tmp_path), "--output-dir",
           str(tmp_path / "out"), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and culprit in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
