"""`sd3 cache --config PRESET [--loaders N] [--only vae] [--section.key=value ...]`: encode the shards once.

`--only vae` writes the VAE posterior of every image into data.latent_cache (format: sd3/data/latents.py), one
file per data shard, skipping shards already cached: the cache of hybrid mode / colocated runs with
data.latent_cache, where captions stay online. Under torchrun the shards are shared out among the processes (one GPU
each with encoders.device=auto). Without it, the rest of this docstring:

Walks epoch 0 of the bucket sampler of each of N loaders (the loader count of the training run that will read
the cache: 1 for a single process, the world size for colocated/cached under torchrun) and writes each step's
latents + text embeddings to topology.cache_folder (format: sd3/data/cached.py). Under torchrun the loaders
are shared out among the processes. Interrupted runs resume: finished step files are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator

from tqdm import tqdm

from sd3.config import Config
from sd3.config_loader import load_config
from sd3.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset name (sd3/configs) or path to a TOML file")
    parser.add_argument("--loaders", type=int, default=1,
                        help="loader streams to cache (= processes of the cached training run); default 1")
    parser.add_argument("--steps", type=int, default=0,
                        help="cache only the first STEPS sampler steps of each loader (default 0: one epoch); "
                             "rows left out are skipped as not_cached when training")
    parser.add_argument("--only", choices=("all", "vae"), default="all",
                        help="vae: cache only the VAE posteriors into data.latent_cache (incremental, per shard)")


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.loaders < 1:
        print("sd3 cache: error: --loaders must be >= 1", file=sys.stderr)
        return 2
    if args.only == "vae":
        return build_latent_cache(cfg)
    return build_cache(cfg, args.loaders, args.steps)


@contextlib.contextmanager
def cache_processes() -> Iterator[tuple[int, int]]:
    """(rank, world) of this process; under torchrun (WORLD_SIZE > 1) inside a gloo process group, for the
    barrier and the counts at the end (the work itself is shared out by rank, without messages)."""
    import torch.distributed as dist

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
    try:
        yield rank, world
    finally:
        if world > 1:
            dist.destroy_process_group()


def build_latent_cache(cfg: Config) -> int:
    """Cache the VAE posterior of every shard of data.parquet_folder not yet in data.latent_cache."""
    from sd3.commands.train import runtime_settings
    from sd3.data.latents import LatentCacheWriter
    from sd3.data.shards import ShardReader
    from sd3.encoders.vae import LatentVAE

    if not cfg.data.latent_cache:
        raise ConfigError("sd3 cache --only vae writes into data.latent_cache: pass --data.latent_cache=FOLDER")
    import torch
    import torch.distributed as dist

    enc = cfg.encoders
    with cache_processes() as (rank, world):
        with runtime_settings(cfg.train):
            vae = LatentVAE.load(enc.vae, enc.vae_subfolder, enc.device, enc.vae_dtype, with_decoder=False,
                                 micro_batch=enc.vae_micro_batch, memory_gb=enc.vae_memory_gb,
                                 channels_last=enc.vae_channels_last, compile=enc.vae_compile,
                                 latent_norm=enc.latent_norm)
            writer = LatentCacheWriter(cfg.data.latent_cache, ShardReader(cfg.data.parquet_folder))
            written = len(writer.write_all(vae, progress=rank == 0, rank=rank, world=world))
        if world > 1:
            total = torch.tensor([written])
            dist.all_reduce(total)  # also the barrier: every shard is on disk when rank 0 reports
            written = int(total.item())
        if rank == 0:
            print(f"sd3 cache: {written} new shards cached in {cfg.data.latent_cache} "
                  f"({len(writer.reader.paths) - written} already there"
                  + (f"; {world} processes" if world > 1 else "") + ")", flush=True)
        return 0


def build_cache(cfg: Config, num_loaders: int, max_steps: int = 0) -> int:
    """Write the cache of `num_loaders` loader streams; this process does the loaders with index % world == rank."""
    from sd3.commands.train import runtime_settings

    # The encoders' last bits depend on the CPU thread count: cache with the settings training will use.
    with runtime_settings(cfg.train):
        return write_cache(cfg, num_loaders, max_steps)


def write_cache(cfg: Config, num_loaders: int, max_steps: int) -> int:
    import torch.distributed as dist

    from sd3.data.cached import CacheWriter
    from sd3.encoders.producer import BatchProducer

    with cache_processes() as (rank, world):
        writer = CacheWriter(cfg.topology.cache_folder)
        skipped: dict[str, int] = {}
        producer = None
        for loader_index in range(rank, num_loaders, world):
            producer = BatchProducer(cfg, cfg.data.batch_size, loader_index, num_loaders, cfg.encoders.device)
            steps = producer.sampler.batches_per_epoch
            if max_steps > 0:
                steps = min(steps, max_steps)
            for step in tqdm(range(steps), desc=f"cache loader {loader_index}/{num_loaders}", disable=rank != 0):
                if writer.has(loader_index, step):
                    continue
                batch = producer(step)[0].to("cpu")
                if len(batch):
                    writer.write(loader_index, step, producer.sampler.batch(step).bucket, batch)
            for reason, n in producer.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + n
            producer.close()
        if world > 1:
            dist.barrier()
        if rank == 0 and producer is not None:
            m = cfg.model
            manifest = writer.finish({
                "parquet_folder": str(cfg.data.parquet_folder),
                "index_rows": producer.index.num_rows,
                "buckets": list(producer.index.buckets),
                "seed": cfg.data.seed,
                "batch_size": cfg.data.batch_size,
                "num_loaders": num_loaders,
                "text_tokens": m.text_tokens,
                "context_dim": m.context_dim,
                "pooled_dim": m.pooled_dim,
                "in_channels": m.in_channels,
                "batch_dtype": cfg.encoders.batch_dtype,
                "skipped_rows_this_run": skipped,
            })
            print(f"sd3 cache: {manifest['rows_cached']} rows in {manifest['files']} files in "
                  f"{cfg.topology.cache_folder} (skipped this run: {skipped})", flush=True)
        return 0
