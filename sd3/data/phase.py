"""`create-phase`: raw shards -> phase shards, every image resized into its bucket (source "Create a subset").

One output shard per input shard, same file name. A shard is written atomically (shards.write_table), so an
output that exists is complete and a re-run skips it: the command resumes after a crash or a pre-emption.
A damaged or incompatible input shard (not parquet, a column missing, a row group that cannot be read) is skipped
and counted by reason, as bad rows are; the run goes on, and `create_phase_report.json` in the output folder names
every skipped shard and why.
Shards are processed in parallel by worker processes (decode and resize hold the GIL in places, and the
work per shard is large enough to pay for a process).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from sd3.data.buckets import BUCKET_MODES, bucket_name, fit, target_size
from sd3.data.captions import caption_text
from sd3.data.images import BadImage, decode_image, encode_image
from sd3.data.shards import (
    PHASE_ROW_GROUP_BYTES,
    PHASE_SCHEMA,
    RAW_COLUMNS,
    ShardError,
    image_values,
    list_shards,
    row_group_rows_for,
    shard_row_count,
    text_values,
    write_table,
)

log = logging.getLogger(__name__)

READ_BATCH_ROWS = 256  # raw shards hold full-size images: read them a slice at a time
FORMATS = ("png", "jpeg", "webp")
REPORT_FILE = "create_phase_report.json"


class BadShard(Exception):
    """An input shard to skip: `reason` (not_parquet | missing_column | unreadable) and what was wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason, detail)  # both in args, so it crosses the process pool's pickling intact
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class PhaseOptions:
    """max_res: longest side (exact) or sqrt of the area (area); patch_size: sides are multiples of it;
    fmt/quality: re-encoding (png is lossless; quality applies to jpeg/webp); bucket_mode: exact | area;
    row_group_bytes: image bytes per parquet row group (the unit of a random read)."""

    max_res: int = 256
    patch_size: int = 16
    fmt: str = "png"
    quality: int = 95
    bucket_mode: str = "exact"
    row_group_bytes: int = PHASE_ROW_GROUP_BYTES

    def __post_init__(self):
        if self.patch_size < 1 or self.max_res < self.patch_size:
            raise ValueError(f"max_res {self.max_res} must be >= patch_size {self.patch_size} >= 1")
        if self.max_res % self.patch_size:
            raise ValueError(f"max_res {self.max_res} is not a multiple of patch_size {self.patch_size}")
        if self.fmt not in FORMATS:
            raise ValueError(f"format {self.fmt!r} not one of {', '.join(FORMATS)}")
        if self.bucket_mode not in BUCKET_MODES:
            raise ValueError(f"bucket mode {self.bucket_mode!r} not one of {', '.join(BUCKET_MODES)}")


@dataclass
class PhaseSummary:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    shards_written: int = 0
    shards_skipped: int = 0  # already existed (resume)
    buckets: Counter = field(default_factory=Counter)  # bucket -> rows, of the shards written in this run
    bad_shards: dict[str, tuple[str, str]] = field(default_factory=dict)  # shard name -> (reason, detail)

    def line(self) -> str:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        bad = Counter(reason for reason, _ in self.bad_shards.values())
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))
        return (
            f"create-phase: kept {self.kept} rows, dropped {sum(self.dropped.values())} ({dropped}); "
            f"{self.shards_written} shards written, {self.shards_skipped} already done"
            + (f", {len(self.bad_shards)} damaged shards skipped ({skipped}, see {REPORT_FILE})" if bad else "")
            + f"; {len(self.buckets)} buckets in the new shards"
        )

    def report(self) -> dict:
        """The JSON report written next to the shards: counts, and every skipped shard with its reason."""
        return {
            "kept_rows": self.kept, "dropped_rows": dict(sorted(self.dropped.items())),
            "shards_written": self.shards_written, "shards_already_done": self.shards_skipped,
            "skipped_shards": {name: {"reason": r, "detail": d} for name, (r, d) in sorted(self.bad_shards.items())},
        }


def convert_row(image: bytes | None, recaption: object, recaption_short: object, opt: PhaseOptions) -> dict:
    """One raw row -> one phase row. Raises BadImage(reason) for a row to drop."""
    long, short = caption_text(recaption), caption_text(recaption_short)
    if long is None or short is None:
        raise BadImage("bad_caption")
    img = decode_image(image)
    height, width = target_size(img.height, img.width, opt.max_res, opt.patch_size, opt.bucket_mode)
    if height < opt.patch_size or width < opt.patch_size:
        raise BadImage("too_small", f"{img.width}x{img.height} -> {width}x{height}")
    img = fit(img, height, width, opt.bucket_mode)
    return {
        "image": encode_image(img, opt.fmt, opt.quality),
        "recaption": long,
        "recaption_short": short,
        "height": height,
        "width": width,
        "aspect_ratio": width / height,
        "bucket_size": bucket_name(height, width),
    }


def convert_shard(src: Path, dst: Path, opt: PhaseOptions) -> tuple[int, Counter, Counter]:
    """Convert one raw shard; returns (rows kept, rows dropped by reason, rows per bucket). Raises BadShard."""
    try:
        pf = pq.ParquetFile(src)
    except (OSError, pa.ArrowException) as e:
        raise BadShard("not_parquet", str(e)) from None
    missing = [c for c in RAW_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise BadShard("missing_column", f"no column {missing[0]!r}; a raw shard needs {', '.join(RAW_COLUMNS)}")
    rows, dropped, buckets = [], Counter(), Counter()
    try:
        for batch in pf.iter_batches(batch_size=READ_BATCH_ROWS, columns=list(RAW_COLUMNS)):
            images = image_values(batch.column("image"))
            longs, shorts = text_values(batch.column("recaption")), text_values(batch.column("recaption_short"))
            for image, long, short in zip(images, longs, shorts, strict=True):
                try:
                    row = convert_row(image, long, short, opt)
                except BadImage as e:
                    dropped[e.reason] += 1
                    continue
                rows.append(row)
                buckets[row["bucket_size"]] += 1
    except (OSError, pa.ArrowException, ShardError) as e:  # a damaged row group, a column of the wrong type
        raise BadShard("unreadable", str(e)) from None
    table = pa.Table.from_pylist(rows, schema=PHASE_SCHEMA)
    meta = {"sd3.max_res": opt.max_res, "sd3.patch_size": opt.patch_size, "sd3.bucket_mode": opt.bucket_mode,
            "sd3.format": opt.fmt}
    write_table(dst, table, row_group_rows=row_group_rows_for(table, opt.row_group_bytes), metadata=meta)
    return len(rows), dropped, buckets


def create_phase(input_dir: str | Path, output_dir: str | Path, opt: PhaseOptions, workers: int = 1,
                 progress: bool = True) -> PhaseSummary:
    """Convert every raw shard of input_dir not yet in output_dir. workers <= 1 runs in this process.
    Damaged shards are skipped and listed in the summary and in output_dir/create_phase_report.json."""
    sources = list_shards(input_dir)
    if not sources:
        raise FileNotFoundError(f"{input_dir}: no .parquet shards")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    summary = PhaseSummary()
    todo = []
    for src in sources:
        dst = output_dir / src.name
        if dst.exists():
            summary.shards_skipped += 1
            summary.kept += shard_row_count(dst)
        else:
            todo.append((src, dst))
    if summary.shards_skipped:
        log.info("create-phase: %d of %d shards already done, skipping them", summary.shards_skipped, len(sources))

    bar = tqdm(total=len(todo), unit="shard", desc="create-phase", disable=not progress)

    def record(result: tuple[int, Counter, Counter]) -> None:
        kept, dropped, buckets = result
        summary.kept += kept
        summary.dropped.update(dropped)
        summary.buckets.update(buckets)
        summary.shards_written += 1
        bar.update(1)
        bar.set_postfix(kept=summary.kept, dropped=sum(summary.dropped.values()))

    def skip(src: Path, e: BadShard) -> None:
        # One bad shard out of thousands must not cost the run: count it, name it in the report, go on.
        summary.bad_shards[src.name] = (e.reason, e.detail)
        log.warning("create-phase: skipping %s (%s: %s)", src, e.reason, e.detail)
        bar.update(1)

    try:
        if workers <= 1 or len(todo) <= 1:
            for src, dst in todo:
                try:
                    record(convert_shard(src, dst, opt))
                except BadShard as e:
                    skip(src, e)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(convert_shard, src, dst, opt): src for src, dst in todo}
                for future in as_completed(futures):
                    try:
                        record(future.result())
                    except BadShard as e:
                        skip(futures[future], e)
    finally:
        bar.close()
    (output_dir / REPORT_FILE).write_text(json.dumps(summary.report(), indent=2) + "\n")
    return summary
