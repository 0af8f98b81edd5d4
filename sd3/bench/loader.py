"""`sd3 bench loader`: images/s through a loader rank's path (RowLoader decode -> Conditioner) and its time split.

Defaults to the tiny-cpu preset: the tiny models (written to a temporary folder by make_tiny when the preset's
paths do not exist) and a shapes phase dataset made in a temporary folder (make-dataset -> create-phase ->
create-indices), or the dataset given by --folder/--index. Each step draws the batch one loader draws for all its
model ranks (data.batch_size x topology.models_per_loader). Side by side, the same batches encoded one caption and
one image at a time show what batching buys. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sd3.bench import print_result
from sd3.config import Config
from sd3.config_loader import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny-cpu", help="preset name or TOML path (default: tiny-cpu)")
    parser.add_argument("--folder", default="", help="phase shard folder (default: a shapes dataset made here)")
    parser.add_argument("--index", default="", help="its bucket index .npz (with --folder)")
    parser.add_argument("--rows", type=int, default=512, help="rows of the shapes dataset made when no --folder")
    parser.add_argument("--steps", type=int, default=8, help="timed batches (after one warm-up batch)")
    parser.add_argument("--batch", type=int, default=0, help="rows per batch (default: batch_size x models_per_loader)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default 0: torch's default)")


def ensure_tiny_models(args: argparse.Namespace, cfg: Config, tmp: Path) -> tuple[Config, str]:
    """The config with [encoders] pointed at tiny models written under `tmp` when the configured local folders do
    not exist, and which it is."""
    enc = cfg.encoders
    if all(Path(p).exists() for p in (enc.clip, enc.gemma, enc.bert, enc.vae)):
        return cfg, "configured"
    from sd3.encoders.tiny import make_tiny, tiny_overrides

    root = make_tiny(tmp / "tiny-models")
    return load_config(args.config, list(args.overrides) + tiny_overrides(root)), "make_tiny"


def ensure_dataset(args: argparse.Namespace, cfg: Config, tmp: Path) -> tuple[Path, Path]:
    if args.folder:
        index = Path(args.index) if args.index else Path(cfg.data.bucket_indices_path)
        return Path(args.folder), index
    from sd3.data.synthetic import prepare_shapes

    data = prepare_shapes(tmp / "shapes", args.rows, max_res=cfg.model.max_res)
    return data.phase, data.index


def main(args: argparse.Namespace) -> int:
    from sd3.data.batches import RawBatch, RowLoader
    from sd3.data.index import BucketIndex
    from sd3.data.sampler import PURPOSE_VAE, BucketBatchSampler
    from sd3.encoders.conditioner import PARTS, Conditioner

    cfg = load_config(args.config, args.overrides)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="sd3-bench-loader-") as tmp_name:
        tmp = Path(tmp_name)
        cfg, models = ensure_tiny_models(args, cfg, tmp)
        folder, index_path = ensure_dataset(args, cfg, tmp)
        index = BucketIndex.load(index_path, folder)
        batch_rows = args.batch or cfg.data.batch_size * cfg.topology.models_per_loader
        sampler = BucketBatchSampler(index, global_batch=batch_rows, seed=cfg.data.seed, loader_index=0,
                                     num_loaders=1, min_bucket_size=batch_rows)
        conditioner = Conditioner(cfg, cfg.encoders.device)
        print(f"bench loader: {folder} ({index.num_rows} rows), models {models}, device {conditioner.device}, "
              f"text {cfg.encoders.text_dtype}, vae {cfg.encoders.vae_dtype}, {batch_rows} rows/batch, "
              f"{torch.get_num_threads()} threads", flush=True)

        with RowLoader(folder, cfg.data, index.manifest.get("rows")) as loader:
            def run(step: int) -> tuple[RawBatch, float]:
                sampler_batch = sampler.batch(step)
                start = time.perf_counter()
                raw = loader.load(sampler_batch)
                decode = time.perf_counter() - start
                conditioner(raw, sampler_batch.torch_generator(PURPOSE_VAE))
                return raw, decode

            last, _ = run(0)  # warm-up: first-call allocations and kernel selection
            conditioner.timings = dict.fromkeys(PARTS, 0.0)
            images, decode_s = 0, 0.0
            start = time.perf_counter()
            for step in range(1, args.steps + 1):
                last, decode = run(step)
                images += len(last)
                decode_s += decode
            total_s = time.perf_counter() - start
            split = {"decode": decode_s, **{p: conditioner.timings[p] for p in PARTS}}

            # Side by side: the last batch again, one sample at a time (what batching saves).
            start = time.perf_counter()
            for i in range(len(last)):
                one = RawBatch(last.images[i : i + 1], last.captions[i : i + 1], last.row_ids[i : i + 1], {})
                conditioner(one)
            per_sample_s = time.perf_counter() - start
            batched_start = time.perf_counter()
            conditioner(last)
            batched_s = time.perf_counter() - batched_start

    figures = {
        "bench": "loader",
        "config": args.config,
        "device": str(conditioner.device),
        "text_dtype": cfg.encoders.text_dtype,
        "vae_dtype": cfg.encoders.vae_dtype,
        "threads": torch.get_num_threads(),
        "rows_per_batch": batch_rows,
        "steps": args.steps,
        "images": images,
        "images_per_s": round(images / total_s, 2),
        "split_s": {k: round(v, 4) for k, v in split.items()},
        "split_pct": {k: round(100 * v / total_s, 1) for k, v in split.items()},
        "encode_batched_images_per_s": round(len(last) / batched_s, 2),
        "encode_per_sample_images_per_s": round(len(last) / per_sample_s, 2),
        "batched_over_per_sample": round(per_sample_s / batched_s, 2),
    }
    print_result(figures)
    return 0
