"""Recaptioning raw shards (SEED_SPEC §i): a vision-language model writes `recaption`, a text LLM shortens it to
`recaption_short`; rows whose caption fails the source's rules are dropped and counted by reason.

One output shard per input shard, same file name, written atomically (a temporary file renamed into place), so a
shard whose output exists is done and a rerun skips it: the job resumes per shard. Under torchrun each rank takes
every WORLD_SIZE-th shard (shards[rank::world]) on its own GPU; no rank waits for another. The input's caption
column is kept as `alt_text` (the captioner's hint). Unlike the source, input shards are never deleted.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from sd3.data.caption_rules import SHORT_FAILED, clean, failure

CaptionFn = Callable[[list[Image.Image], list[str]], list[str]]  # (images, alt-text hints) -> captions
ShortenFn = Callable[[list[str]], list[str]]  # captions -> one-sentence captions
HINT_COLUMNS = ("alt_text", "recaption", "caption", "class", "text")  # the first one present is the hint


@dataclass
class RecaptionSummary:
    """Counts over the shards this process handled. `dropped` is by reason (caption_rules), `skipped_shards` by
    why a shard was not processed (done = its output already existed)."""

    rows_in: int = 0
    rows_out: int = 0
    shards_done: int = 0
    dropped: Counter = field(default_factory=Counter)
    skipped_shards: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"rows_in": self.rows_in, "rows_out": self.rows_out, "shards_done": self.shards_done,
                "dropped": dict(self.dropped), "skipped_shards": dict(self.skipped_shards)}


def my_shards(input_dir: Path, rank: int, world: int) -> list[Path]:
    """This rank's shards: every world-th of the sorted *.parquet files, starting at `rank`."""
    return sorted(input_dir.glob("*.parquet"))[rank::world]


def hint_column(names: list[str]) -> str | None:
    return next((c for c in HINT_COLUMNS if c in names), None)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write to a temporary name in the same folder, then rename: a reader never sees a half-written shard."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def recaption_table(table: pa.Table, caption: CaptionFn, shorten: ShortenFn, batch_size: int,
                    summary: RecaptionSummary, bar: tqdm | None = None) -> pa.Table:
    """One shard's rows -> the kept rows with `recaption`, `recaption_short` (and `alt_text`) set."""
    hint_name = hint_column(table.column_names)
    hints_all = table.column(hint_name).to_pylist() if hint_name else [""] * table.num_rows
    images_all = table.column("image").to_pylist()
    keep: list[int] = []
    long_captions: list[str] = []
    short_captions: list[str] = []
    for start in range(0, table.num_rows, batch_size):
        rows = range(start, min(start + batch_size, table.num_rows))
        images = [Image.open(io.BytesIO(images_all[i])).convert("RGB") for i in rows]
        hints = [hints_all[i] or "" for i in rows]
        cleaned = [clean(c) for c in caption(images, hints)]
        good = [(i, text) for i, (text, reason) in zip(rows, cleaned, strict=True) if reason is None]
        summary.dropped.update(reason for _, reason in cleaned if reason is not None)
        shorts = shorten([text for _, text in good]) if good else []
        for (i, text), short in zip(good, shorts, strict=True):
            if failure(short) is not None:
                summary.dropped[SHORT_FAILED] += 1
                continue
            keep.append(i)
            long_captions.append(text)
            short_captions.append(short)
        if bar is not None:
            bar.update(len(rows))
    out = table.take(pa.array(keep, pa.int64()))
    if hint_name is not None and hint_name != "alt_text":
        out = out.append_column("alt_text", out.column(hint_name).cast(pa.string()))
    for name, values in (("recaption", long_captions), ("recaption_short", short_captions)):
        column = pa.array(values, pa.string())
        out = out.set_column(out.column_names.index(name), name, column) if name in out.column_names \
            else out.append_column(name, column)
    summary.rows_in += table.num_rows
    summary.rows_out += out.num_rows
    return out


def recaption_shards(shards: list[Path], output_dir: Path, caption: CaptionFn, shorten: ShortenFn,
                     batch_size: int = 64, progress: bool = True) -> RecaptionSummary:
    """Recaption each shard into output_dir/<same name>; shards whose output exists are skipped (resume)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = RecaptionSummary()
    todo = []
    for shard in shards:
        if (output_dir / shard.name).exists():
            summary.skipped_shards["done"] += 1
        else:
            todo.append(shard)
    total = sum(pq.ParquetFile(s).metadata.num_rows for s in todo)
    with tqdm(total=total, desc="recaption", unit="row", disable=not progress) as bar:
        for shard in todo:
            table = pq.read_table(shard)
            if "image" not in table.column_names:
                summary.skipped_shards["no_image_column"] += 1
                bar.update(table.num_rows)
                continue
            write_atomic(recaption_table(table, caption, shorten, batch_size, summary, bar), output_dir / shard.name)
            summary.shards_done += 1
    return summary
