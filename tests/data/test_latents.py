"""The VAE posterior cache (data.latent_cache, `sd3 cache --only vae`) and hybrid encoding from it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fixtures.training import straight_and_resumed

from sd3.cli import main as cli_main
from sd3.commands.cache import build_latent_cache
from sd3.config_loader import load_config
from sd3.data.batches import decode_row, to_unit_range
from sd3.data.latents import LatentCacheReader, LatentCacheWriter, shard_file
from sd3.data.shards import ShardReader
from sd3.encoders.producer import BatchProducer
from sd3.encoders.vae import LatentVAE


def config(tiny_models, shapes_phase, *extra: str):
    return load_config("tiny-cpu", [*tiny_models.overrides, f"--data.parquet_folder={shapes_phase.folder}",
                                    f"--data.bucket_indices_path={shapes_phase.index_path}", *extra])


@pytest.fixture(scope="module")
def latent_cache(tiny_models, shapes_phase, tmp_path_factory):
    folder = tmp_path_factory.mktemp("latent-cache")
    assert build_latent_cache(config(tiny_models, shapes_phase, f"--data.latent_cache={folder}")) == 0
    return folder


def test_every_row_is_cached_once(latent_cache, shapes_phase):
    reader = ShardReader(shapes_phase.folder)
    assert sorted(p.name for p in latent_cache.glob("*.safetensors")) == sorted(shard_file(p) for p in reader.paths)
    manifest = json.loads((latent_cache / "manifest.json").read_text())
    assert manifest["latent_channels"] == 16 and manifest["downsample"] == 8 and manifest["dtype"] == "bf16"
    cache = LatentCacheReader(latent_cache, reader)
    sizes = {}
    for row in range(reader.num_rows):  # every row is found at its stored size, nowhere else
        table = reader.read([row], ["bucket_size"])
        h, w = map(int, table.column("bucket_size")[0].as_py().split("x"))
        posterior, reasons = cache.lookup(np.array([row]), h, w)
        assert reasons == [None] and posterior.shape == (1, 2, 16, h // 8, w // 8)
        assert posterior.dtype == torch.bfloat16 and (posterior[:, 1] > 0).all()  # std > 0
        sizes[(h, w)] = sizes.get((h, w), 0) + 1
        other = (w, h) if h != w else (h // 2, w)
        assert cache.lookup(np.array([row]), *other)[1] == ["size_mismatch"]
    assert sum(sizes.values()) == shapes_phase.num_rows and len(sizes) > 1


def test_cached_posterior_is_the_vae_posterior(latent_cache, shapes_phase, tiny_models):
    reader = ShardReader(shapes_phase.folder)
    table = reader.read([3], ["image", "bucket_size"])
    pixels, _ = decode_row(table.column("image")[0].as_py())
    vae = LatentVAE.load(str(tiny_models.root / "flux"), "vae", "cpu", "fp32", with_decoder=False)
    mean, std = vae.moments(to_unit_range(pixels[None]))  # (1, C, h, w) x 2
    posterior, _ = LatentCacheReader(latent_cache, reader).lookup(np.array([3]), *pixels.shape[:2])
    torch.testing.assert_close(posterior[:, 0].float(), mean, atol=2e-2, rtol=1e-2)  # bf16 rounding
    torch.testing.assert_close(posterior[:, 1].float(), std, atol=2e-2, rtol=1e-2)


def test_incremental_only_missing_shards_are_written(latent_cache, shapes_phase, tiny_models, tmp_path):
    folder = tmp_path / "cache"
    reader = ShardReader(shapes_phase.folder)
    vae = LatentVAE.load(str(tiny_models.root / "flux"), "vae", "cpu", "fp32", with_decoder=False)
    for p in latent_cache.iterdir():
        folder.mkdir(exist_ok=True)
        (folder / p.name).write_bytes(p.read_bytes())
    dropped = folder / shard_file(reader.paths[1])
    dropped.unlink()
    kept = folder / shard_file(reader.paths[0])
    before = kept.stat().st_mtime_ns
    cache = LatentCacheReader(folder, reader)
    rows = np.arange(reader.offsets[1], reader.offsets[2])
    assert set(cache.lookup(rows, 64, 64)[1]) == {"not_cached"}
    assert LatentCacheWriter(folder, reader).write_all(vae) == [reader.paths[1].name]
    assert kept.stat().st_mtime_ns == before and dropped.is_file()
    assert LatentCacheWriter(folder, reader).write_all(vae) == []


def test_cache_vae_needs_a_folder(tiny_models, shapes_phase, capsys):
    assert cli_main(["cache", "--config", "tiny-cpu", "--only", "vae", *tiny_models.overrides]) == 2
    assert "data.latent_cache" in capsys.readouterr().err


def test_first_epoch_latents_equal_online_encoding(latent_cache, tiny_models, shapes_phase):
    """Same seed: the same rows, the same captions and text embeddings, the latents up to the cache's bf16."""
    online = BatchProducer(config(tiny_models, shapes_phase), 6, 0, 1, "cpu")
    hybrid = BatchProducer(config(tiny_models, shapes_phase, f"--data.latent_cache={latent_cache}",
                                  "--topology.mode=hybrid"), 6, 0, 1, "cpu")
    try:
        steps = online.sampler.batches_per_epoch
        assert steps > 10
        for step in range(steps):
            a, _, skipped_a = online(step)
            b, timings_b, skipped_b = hybrid(step)
            assert torch.equal(a.row_ids, b.row_ids) and skipped_a == skipped_b
            assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)
            torch.testing.assert_close(b.latents, a.latents, atol=3e-2, rtol=2e-2)
        assert hybrid.rows.latents is not None and timings_b["decode"] >= 0
    finally:
        online.close()
        hybrid.close()


def test_hybrid_needs_a_latent_cache(tiny_models, shapes_phase):
    from sd3.errors import ConfigError

    with pytest.raises(ConfigError, match="data.latent_cache"):
        BatchProducer(config(tiny_models, shapes_phase, "--topology.mode=hybrid"), 6, 0, 1, "cpu")


def test_latent_cache_run_resumes_exactly(latent_cache, tiny_models, shapes_phase, tmp_path):
    """Colocated with data.latent_cache (the producer hybrid loader ranks run): 8 steps = 4, stop, resume, 4."""
    common = ("--topology.mode=colocated", f"--data.latent_cache={latent_cache}", "--train.deterministic=true",
              "--train.save_every=4", "--train.reset_optim=true", "--train.reset_wandb=true")
    a, b = straight_and_resumed(tiny_models, shapes_phase, tmp_path, common, total=8, stop=4)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(1, 9)] == [b[s] for s in range(1, 9)]


def test_bad_images_keep_their_skip_reason(tiny_models, tmp_path):
    """A row whose image was unusable at cache time is skipped with that reason, as online decoding counts it."""
    import io

    import pyarrow as pa
    from PIL import Image

    from sd3.data.shards import write_table

    png = io.BytesIO()
    Image.new("RGB", (32, 16), (200, 10, 10)).save(png, format="PNG")
    table = pa.table({"image": [png.getvalue(), b"not an image", None], "recaption": ["a", "b", "c"],
                      "recaption_short": ["a", "b", "c"]})
    write_table(tmp_path / "data" / "000.parquet", table)
    reader = ShardReader(tmp_path / "data")
    vae = LatentVAE.load(str(tiny_models.root / "flux"), "vae", "cpu", "fp32", with_decoder=False)
    assert LatentCacheWriter(tmp_path / "cache", reader).write_all(vae) == ["000.parquet"]
    posterior, reasons = LatentCacheReader(tmp_path / "cache", reader).lookup(np.array([0, 1, 2]), 16, 32)
    assert reasons == [None, "decode_error", "empty_image"] and posterior.shape == (1, 2, 16, 2, 4)


@pytest.mark.slow
def test_cache_vae_under_torchrun_shares_the_shards(latent_cache, tiny_models, shapes_phase, tmp_path):
    """Two processes split the shards (k % world == rank) and together write the one-process cache."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    folder = tmp_path / "cache"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sd3",
           "cache", "--config", "tiny-cpu", "--only", "vae", *tiny_models.overrides,
           f"--data.parquet_folder={shapes_phase.folder}", f"--data.bucket_indices_path={shapes_phase.index_path}",
           f"--data.latent_cache={folder}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reader = ShardReader(shapes_phase.folder)
    assert len(reader.paths) >= 2  # both processes have shards to write
    assert f"{len(reader.paths)} new shards cached" in proc.stdout and "2 processes" in proc.stdout
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (folder, latent_cache)]
    assert manifests[0] == manifests[1]
    for path in reader.paths:
        ours, one_process = (load_file(str(f / shard_file(path))) for f in (folder, latent_cache))
        assert ours.keys() == one_process.keys()
        for key, value in ours.items():  # bf16 posteriors: the thread count may move a last bit
            torch.testing.assert_close(value.float(), one_process[key].float(), atol=1e-2, rtol=1e-2)


def test_writers_of_a_world_share_the_shards_out(latent_cache, shapes_phase, tiny_models, tmp_path):
    reader = ShardReader(shapes_phase.folder)
    vae = LatentVAE.load(str(tiny_models.root / "flux"), "vae", "cpu", "fp32", with_decoder=False)
    parts = [LatentCacheWriter(tmp_path, reader).write_all(vae, rank=r, world=3) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(p.name for p in reader.paths)
    assert parts[0] == [p.name for p in reader.paths[0::3]] and parts[2] == [p.name for p in reader.paths[2::3]]
