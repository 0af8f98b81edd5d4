"""`sd3 quickstart`: from nothing and offline to a grid of generated shapes, on CPU.

Stages, each skipped when its output is already there (so an interrupted quick start picks up where it stopped):
  1. make-tiny        tiny encoders + the shapes-trained tiny VAE        -> ROOT/data/tiny-models
  2. make-dataset     synthetic shapes with captions (raw shards)        -> ROOT/data/quickstart/raw
  3. create-phase     resized into buckets, sides multiples of 16        -> ROOT/data/quickstart/phase
  4. create-indices   bucket -> row ids                                  -> ROOT/data/quickstart/bucket_indices.npz
                      (2-4 again for a small held-out set of another seed -> ROOT/data/quickstart/heldout)
  5. cache            the VAE posterior of every image (sd3 cache --only vae) -> ROOT/data/quickstart/latents
  6. train            torchrun, 1 loader rank + 2 model ranks, gloo/CPU  -> ROOT/runs/quickstart (resumes from latest)
                      in hybrid mode: the loader draws each latent from the cached posterior with the step's
                      generator (the distribution of online encoding) and runs the text encoders online, which
                      leaves the two cores more time for the model ranks (~16 % faster steps than full online);
                      validating every 500 steps and at the end: grids in runs/quickstart/samples, val_loss
  7. sample           a grid for a few prompts                           -> ROOT/runs/quickstart/quickstart_grid.png
Each stage prints its progress; the last line is the path of the grid PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sd3.commands import make_tiny
from sd3.commands.arguments import run_command, torchrun_entry
from sd3.devices import resolve_precision_name

HELDOUT_IMAGES = 64  # held-out shapes for the validation loss (validation.rows of the preset: 32)
HELDOUT_SEED = 1  # another seed than the training set's 0: other shapes, colours and positions
VALIDATE_EVERY = 500

PROMPTS = (  # the shapes data's caption style: one chromatic shape on white or black (sd3/data/synthetic.py)
    "A red circle in the center of a white background.",
    "A yellow square in the center of a black background.",
    "A green triangle in the center of a white background.",
    "A blue star in the center of a black background.",
    "A purple diamond in the center of a white background.",
    "An orange circle in the top left of a black background.",
    "A blue square in the bottom right of a white background.",
    "A red triangle at the top of a black background.",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=".", help="where data/ and runs/ go (default: the current directory)")
    parser.add_argument("--steps", type=int, default=3500,
                        help="training steps (optimizer steps; 2.4-3.0 min per 1000 on 2 cores in fp32)")
    # 20000 rather than 4000: 3500 steps of 32 images are 5.6 epochs instead of 28, and the shapes of the non-square
    # buckets (a fifth to a quarter of the images each) generalise to held-out prompts (bench learn shape accuracy
    # 76.0 -> 80.2 %); making and caching the extra images costs ~30 s.
    parser.add_argument("--n-images", type=int, default=20000, help="size of the synthetic shapes dataset")
    parser.add_argument("--batch-size", type=int, default=16, help="per model rank")
    parser.add_argument("--vae-weights", default="",
                        help="trained tiny-VAE weights (default: the ones shipped in sd3/assets)")
    parser.add_argument("--vae-steps", type=int, default=3000,
                        help="tiny-VAE training steps, only when there are no trained weights")
    parser.add_argument("--sample-steps", type=int, default=30, help="sampler steps for the grid")
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale of the grid (default: the preset's)")
    parser.add_argument("--prompt", action="append", default=[], help="grid prompts (default: 8 shapes prompts)")
    parser.add_argument("--nproc", type=int, default=3, help="torchrun processes: 1 loader + (nproc - 1) model ranks")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the tiny-cpu preset for training (e.g. --set train.precision=fp32); repeatable")
    parser.add_argument("--force", action="store_true", help="redo every stage")


def main(args: argparse.Namespace) -> int:
    root = Path(args.root).resolve()
    paths = Paths(root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on the hub
    os.environ.setdefault("WANDB_MODE", "disabled")
    start = time.perf_counter()
    code, remade = make_tiny_stage(paths, args)
    if code:
        print(f"sd3 quickstart: error: stage make-tiny failed (exit code {code})", file=sys.stderr)
        return code
    remade += prepare_data(paths, args)
    code = cache_stage(paths, args, remade)
    if code:
        print(f"sd3 quickstart: error: stage cache failed (exit code {code})", file=sys.stderr)
        return code
    done = finished_step(paths.run)
    if remade and done >= 0 and not args.force:
        # Resuming would continue a model trained on other tiny models or data (e.g. after upgrading sd3).
        print(f"sd3 quickstart: error: {paths.run} holds a checkpoint (step {done}) made before {', '.join(remade)} "
              "was redone; move it away or re-run with --force", file=sys.stderr)
        return 2

    code = train(paths, args)
    if code:
        print(f"sd3 quickstart: error: training failed (exit code {code}); re-run sd3 quickstart to resume it",
              file=sys.stderr)
        return code
    grid = sample(paths, args)
    print(f"quick start finished in {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    print(grid, flush=True)
    return 0


class Paths:
    def __init__(self, root: Path):
        from sd3.data.synthetic import ShapesDataset

        self.root = root
        self.models = root / "data" / "tiny-models"
        self.data = root / "data" / "quickstart"
        self.shapes = ShapesDataset.under(self.data)  # raw, phase, index
        self.heldout = ShapesDataset.under(self.data / "heldout")  # the validation loss's rows, never trained on
        self.latents = self.data / "latents"  # the training images' VAE posteriors (hybrid mode)
        self.run = root / "runs" / "quickstart"
        self.grid = self.run / "quickstart_grid.png"


def make_tiny_stage(paths: Paths, args: argparse.Namespace) -> tuple[int, list[str]]:
    """Stage 1, skipped when its marker names the same VAE weights: (exit code, ["make-tiny"] if it ran)."""
    import hashlib

    from sd3.encoders.tiny import TINY_VAE_WEIGHTS

    weights = Path(args.vae_weights) if args.vae_weights else TINY_VAE_WEIGHTS
    vae = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else f"trained {args.vae_steps} steps"
    marker = paths.models / ".complete"  # make_tiny.json is make_tiny's own record; this is the stage's
    if marker.exists() and json.loads(marker.read_text()).get("vae") == vae and not args.force:
        print(f"[1/7] make-tiny: done already ({paths.models})", flush=True)
        return 0, []
    print("[1/7] make-tiny ...", flush=True)
    t0 = time.perf_counter()
    argv = ["--out", str(paths.models), "--vae-weights", str(weights)]
    if not weights.is_file():
        # No shipped weights: train the tiny VAE on shapes here so it reconstructs them (a few minutes).
        argv += ["--train-vae-steps", str(args.vae_steps)]
    code = run_command(make_tiny, "sd3 make-tiny", argv)
    if code == 0:
        marker.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "vae": vae}))
        print(f"[1/7] make-tiny: {time.perf_counter() - t0:.0f} s", flush=True)
    return code, ["make-tiny"]


def prepare_data(paths: Paths, args: argparse.Namespace) -> list[str]:
    """Stages 2-4: the shapes dataset through make-dataset -> create-phase -> create-indices (done stages skipped).
    Returns the stages that ran."""
    import shutil

    from sd3.data.synthetic import prepare_shapes

    numbers = {"make-dataset": 2, "create-phase": 3, "create-indices": 4}
    if args.force and paths.data.exists():
        shutil.rmtree(paths.data)

    ran = []

    def log(stage: str, status: str) -> None:
        if status == "...":
            ran.append(stage)
        print(f"[{numbers[stage]}/7] {stage}{'' if status == '...' else ':'} {status}", flush=True)

    prepare_shapes(paths.data, args.n_images, max_res=64, seed=0, n_proc=2, progress=True, log=log)
    # The held-out set does not change what training sees, so redoing it is not a reason to refuse a resume (it is
    # not in `ran`); its stages report on one line of their own.
    heldout_ran = []
    prepare_shapes(paths.data / "heldout", HELDOUT_IMAGES, max_res=64, seed=HELDOUT_SEED, n_proc=1,
                   log=lambda stage, status: heldout_ran.append(stage) if status == "..." else None)
    print(f"[4/7] held-out shapes for validation: {'made' if heldout_ran else 'ready'} ({paths.data / 'heldout'})",
          flush=True)
    return ran


def cache_stage(paths: Paths, args: argparse.Namespace, remade: list[str]) -> int:
    """Stage 5: the VAE posteriors of the training shards, by `sd3 cache --only vae` (complete shards skipped)."""
    import shutil

    from sd3.commands import cache
    from sd3.data.latents import LatentCacheWriter
    from sd3.data.shards import ShardReader

    if remade and paths.latents.exists():
        shutil.rmtree(paths.latents)  # posteriors of other images, or of another VAE: the cache keys rows by name
    writer = LatentCacheWriter(paths.latents, ShardReader(paths.shapes.phase))
    if all(writer.done(k) for k in range(len(writer.reader.paths))):
        print(f"[5/7] cache: done already ({paths.latents})", flush=True)
        return 0
    print("[5/7] cache (VAE posteriors) ...", flush=True)
    t0 = time.perf_counter()
    code = run_command(cache, "sd3 cache", ["--config", "tiny-cpu", "--only", "vae", *overrides(paths, args)])
    if code == 0:
        print(f"[5/7] cache: {time.perf_counter() - t0:.0f} s", flush=True)
    return code


def overrides(paths: Paths, args: argparse.Namespace) -> list[str]:
    """The tiny-cpu preset pointed at this quick start's files."""
    from sd3.encoders.tiny import tiny_overrides

    return tiny_overrides(paths.models) + [
        f"--data.parquet_folder={paths.shapes.phase}",
        f"--data.bucket_indices_path={paths.shapes.index}", f"--data.batch_size={args.batch_size}",
        f"--train.total_steps={args.steps}", f"--train.save_dir={paths.run}",
        f"--train.save_every={max(50, args.steps // 4)}", "--train.resume=auto",
        f"--train.num_threads={args.threads}",
        f"--validation.every={VALIDATE_EVERY}", f"--validation.parquet_folder={paths.heldout.phase}",
        f"--validation.bucket_indices_path={paths.heldout.index}",
        "--topology.mode=hybrid", f"--data.latent_cache={paths.latents}",
    ] + [f"--{item.removeprefix('--')}" for item in args.set]


def finished_step(run_dir: Path) -> int:
    """The step of the checkpoint `--train.resume=auto` continues from in run_dir, or -1."""
    from sd3.train.checkpoint import META_FILE, resolve_checkpoint

    found = resolve_checkpoint("auto", save_dir=run_dir)
    return int(json.loads((found / META_FILE).read_text())["step"]) if found is not None else -1


def train(paths: Paths, args: argparse.Namespace) -> int:
    done = finished_step(paths.run)
    if done >= args.steps and not args.force:
        print(f"[6/7] train: done already ({paths.run}, step {done})", flush=True)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           *torchrun_entry(), "train", "--config", "tiny-cpu", *overrides(paths, args)]
    if args.force and done >= 0:
        cmd = [c for c in cmd if c != "--train.resume=auto"]
    print(f"[6/7] train: {args.steps} steps, 1 loader + {args.nproc - 1} model ranks"
          + (f", resuming from step {done}" if done >= 0 and not args.force else ""), flush=True)
    print("      " + " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    # The trainer's progress lines stream straight to this terminal.
    code = subprocess.run(cmd, env=env).returncode
    if code == 0:
        print(f"[6/7] train: {time.perf_counter() - t0:.0f} s", flush=True)
    return code


def sample(paths: Paths, args: argparse.Namespace) -> Path:
    from tqdm import tqdm

    from sd3.sample.images import make_grid
    from sd3.sample.pipeline import Pipeline

    print("[7/7] sample ...", flush=True)
    # The dtype training ran in: train.precision=auto is bf16 only on a CPU that computes it natively.
    precision = next((item.split("=", 1)[1] for item in args.set
                      if item.removeprefix("--").startswith("train.precision=")), "auto")
    pipe = Pipeline.from_checkpoint(paths.run, device="cpu", dtype=resolve_precision_name(precision, "cpu"))
    prompts = args.prompt or list(PROMPTS)
    bar = tqdm(total=args.sample_steps, desc="sampling", unit="step")

    def progress(step: int, total: int) -> None:
        bar.total = total
        bar.update(step - bar.n)

    result = pipe(prompts, cfg_scale=args.cfg, num_steps=args.sample_steps, batch_size=1, seed=0, progress=progress)
    bar.close()
    scale = max(1, 128 // max(result.images[0].size))  # 64 px images are small on screen
    images = [im.resize((im.width * scale, im.height * scale)) for im in result.images]
    make_grid(images, columns=4).save(paths.grid)
    (paths.grid.with_suffix(".txt")).write_text(
        "".join(f"{i}: {p} (seed {s})\n" for i, (p, s) in enumerate(zip(result.prompts, result.seeds, strict=True))))
    return paths.grid
