"""`import-folder`: an image folder + metadata file (DiffSynth-Studio's dataset format) -> raw shards.

The metadata is `metadata.csv`, `.json` (a list of objects) or `.jsonl` (one object per line) with at least the
columns `image` (a path relative to the image folder) and `prompt`. The prompt becomes both `recaption` and
`recaption_short`. Image bytes are copied as they are; create-phase decodes, checks and resizes them.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from sd3.data.shards import write_table
from sd3.errors import UserError

log = logging.getLogger(__name__)

RAW_IMPORT_SCHEMA = pa.schema(
    [("image", pa.binary()), ("recaption", pa.string()), ("recaption_short", pa.string()), ("file", pa.string())]
)


class MetadataError(UserError, ValueError):
    """A metadata file that cannot be read; the message names the file and the line or entry."""


@dataclass
class ImportSummary:
    imported: int = 0
    missing: list[str] = field(default_factory=list)  # image paths named in the metadata but not found
    no_prompt: int = 0  # entries whose prompt is empty, absent or not text (not imported)
    shards: list[Path] = field(default_factory=list)

    def line(self) -> str:
        shown = ", ".join(self.missing[:5]) + (" ..." if len(self.missing) > 5 else "")
        text = (f"import-folder: {self.imported} rows in {len(self.shards)} shards; "
                f"{len(self.missing)} image files missing")
        text += f" ({shown})" if self.missing else ""
        return text + f"; {self.no_prompt} entries without a prompt"


def read_metadata(path: str | Path) -> list[dict]:
    """Entries of a .csv / .json / .jsonl metadata file, each with 'image' and 'prompt' keys."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            entries = list(csv.DictReader(f))
    elif suffix == ".json":
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise MetadataError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(entries, list):
            raise MetadataError(f"{path}: expected a JSON list of objects, got {type(entries).__name__}")
    elif suffix == ".jsonl":
        entries = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise MetadataError(f"{path}:{number}: invalid JSON ({e})") from None
    else:
        raise MetadataError(f"{path}: metadata must be .csv, .json or .jsonl")
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or "image" not in entry:
            raise MetadataError(f"{path}: entry {number} has no 'image' field")
    return entries


def import_folder(
    images: str | Path, metadata: str | Path, out_dir: str | Path, shard_rows: int = 1000
) -> ImportSummary:
    """Write raw shards `<out_dir>/import-NNNNN.parquet`; missing image files are counted and listed, not fatal."""
    images, out_dir = Path(images), Path(out_dir)
    entries = read_metadata(metadata)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = ImportSummary()
    rows: list[dict] = []

    def flush() -> None:
        path = out_dir / f"import-{len(summary.shards):05d}.parquet"
        write_table(path, pa.Table.from_pylist(rows, schema=RAW_IMPORT_SCHEMA))
        summary.shards.append(path)
        rows.clear()

    for entry in entries:
        name = str(entry["image"])
        file = images / name
        if not file.is_file():
            summary.missing.append(name)
            continue
        prompt = entry.get("prompt")
        prompt = prompt if isinstance(prompt, str) else None
        if not prompt or not prompt.strip():
            summary.no_prompt += 1
            continue
        rows.append({"image": file.read_bytes(), "recaption": prompt, "recaption_short": prompt, "file": name})
        summary.imported += 1
        if len(rows) >= shard_rows:
            flush()
    if rows:
        flush()
    if summary.missing:
        log.warning("%d image files named in %s are missing, e.g. %s",
                    len(summary.missing), metadata, summary.missing[0])
    return summary

