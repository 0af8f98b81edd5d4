"""`sd3 bench learn`: does a model trained on the shapes data follow its captions?

Two measurements on held-out shapes (sd3/data/synthetic.py with a seed the quick start does not train on):
1. The validation flow-matching loss with each image's true caption vs with the captions shuffled across the batch
   (a derangement), and with the null condition (zeros). The images, VAE posterior samples, noise and t are
   identical in all three, so only the text differs: a model that uses its text has loss_true < loss_shuffled.
2. Colour accuracy: images generated from held-out long captions ("A red circle in the top left of a white
   background."); the fraction whose dominant shape colour (sd3/sample/colour.py) is the colour named, and
   shape accuracy: the fraction whose drawn shape (template matching, sd3/sample/shape.py) is the shape named.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from sd3.bench import print_result
from sd3.devices import resolve_precision_name

HELDOUT_SEED = 1  # the quick start's dataset is make-dataset's seed 0: sample i of seed 1 is a different image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default="runs/quickstart",
                        help="checkpoint dir or save_dir (default: the quick start's)")
    parser.add_argument("--n-loss", type=int, default=256, help="held-out images for the validation loss")
    parser.add_argument("--n-prompts", type=int, default=96,
                        help="held-out captions to generate from (±4 %% sampling error at 96)")
    parser.add_argument("--steps", type=int, default=20, help="sampler steps per generated image")
    parser.add_argument("--cfg", type=float, default=None, help="CFG scale (default: the checkpoint's [sample])")
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED, help="seed of the held-out shapes")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="sampling and loss dtype: auto (bf16 if native) | bf16 | fp32")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override the checkpoint's config (e.g. encoders paths)")
    parser.add_argument("--save-grid", default="", help="also write the generated images as a grid PNG here")


def heldout(n: int, seed: int, max_res: int) -> list:
    """Held-out ShapeSamples, rendered directly at the size create-phase would give them at `max_res`."""
    from sd3.data.buckets import exact_size
    from sd3.data.synthetic import ShapeSample, make_shapes, render

    out = []
    for s in make_shapes(n, seed):
        h, w = exact_size(s.labels.height, s.labels.width, max_res)
        labels = dataclasses.replace(s.labels, height=h, width=w)
        out.append(ShapeSample(render(labels), s.recaption, s.recaption_short, labels))
    return out


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A permutation with no fixed point: every image gets another image's caption."""
    perm = torch.randperm(n, generator=generator)
    return torch.roll(perm, 1)[torch.argsort(perm)] if n > 1 else perm


@torch.inference_mode()
def validation_losses(pipe, samples: list, seed: int) -> dict[str, float]:
    """Mean flow-matching loss per condition over the held-out samples, grouped by image size."""
    from sd3.data.captions import clean_caption
    from sd3.encoders.vae import LatentVAE
    from sd3.sample.images import to_tensor
    from sd3.train.flow import draw_path, velocity_loss

    enc = pipe.cfg.encoders
    vae = LatentVAE.load(enc.vae, enc.vae_subfolder, pipe.device, enc.vae_dtype, with_decoder=False,
                         latent_norm=enc.latent_norm)
    rng = np.random.default_rng(seed)
    # Captions as training sees them: long or short at random, then cleaned (sd3/data/batches.py).
    captions = [clean_caption(s.recaption if rng.random() < 0.5 else s.recaption_short, rng) for s in samples]
    generator = torch.Generator().manual_seed(seed)
    totals = {"true": 0.0, "shuffled": 0.0, "null": 0.0}
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        by_size.setdefault((s.labels.height, s.labels.width), []).append(i)
    for (_h, _w), index in sorted(by_size.items()):
        for chunk in (index[k:k + 64] for k in range(0, len(index), 64)):
            images = to_tensor([samples[i].image for i in chunk])  # (B, 3, H, W) in [-1, 1]
            x0 = vae.encode(images, generator).to(pipe.device)  # (B, C, h, w)
            t, noise = draw_path(x0, generator)  # (B,), (B, C, h, w): the trainer's draw (t ~ logit-normal(0, 1))
            context, pooled = pipe.encode([captions[i] for i in chunk])  # (B, 2T, D), (B, P)
            perm = derangement(len(chunk), generator)
            conditions = {
                "true": (context, pooled),
                "shuffled": (context[perm], pooled[perm]),
                "null": (torch.zeros_like(context), torch.zeros_like(pooled)),
            }
            for name, (c, p) in conditions.items():
                with torch.autocast(pipe.device.type, pipe.dtype, enabled=pipe.dtype != torch.float32):
                    # The model holds pipe.dtype weights: its input in that dtype, the target in fp32.
                    loss = velocity_loss(lambda x, *rest: pipe.model(x.to(pipe.dtype), *rest), x0, t, noise, c, p)
                totals[name] += loss.item() * len(chunk)
    return {name: total / len(samples) for name, total in totals.items()}


def colour_accuracy(pipe, samples: list, args: argparse.Namespace) -> dict:
    """Generate one image per held-out long caption, at that sample's size (images of one size in one batch)."""
    from sd3.sample.colour import classify
    from sd3.sample.shape import classify_shape

    by_size: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(samples):
        by_size.setdefault((s.labels.width, s.labels.height), []).append(i)
    images: list = [None] * len(samples)
    for (width, height), index in sorted(by_size.items()):
        result = pipe([samples[i].recaption for i in index], cfg_scale=args.cfg, num_steps=args.steps,
                      sampler=args.sampler, width=width, height=height, batch_size=1,
                      seed=args.seed * 100_000 + index[0])
        for i, image in zip(index, result.images, strict=True):  # one image per prompt
            images[i] = image
    found = [classify(image) for image in images]
    shape_hits = sum(f.shape == s.labels.colour for f, s in zip(found, samples, strict=True))
    background_hits = sum(f.background == s.labels.background for f, s in zip(found, samples, strict=True))
    form_hits = sum(classify_shape(image).shape == s.labels.shape for image, s in zip(images, samples, strict=True))
    return {"colour_accuracy": shape_hits / len(samples), "background_accuracy": background_hits / len(samples),
            "shape_accuracy": form_hits / len(samples), "images": images}


def main(args: argparse.Namespace) -> int:
    from sd3.sample.pipeline import Pipeline

    start = time.perf_counter()
    args.dtype = resolve_precision_name(args.dtype, args.device)  # the JSON says which dtype ran
    pipe = Pipeline.from_checkpoint(args.checkpoint, args.device, args.dtype, overrides=args.set)
    max_res = pipe.cfg.model.max_res
    args.cfg = pipe.cfg.sample.cfg_scale if args.cfg is None else args.cfg

    losses = validation_losses(pipe, heldout(args.n_loss, args.seed, max_res), args.seed)
    print(f"validation loss on {args.n_loss} held-out shapes: true captions {losses['true']:.4f}, "
          f"shuffled captions {losses['shuffled']:.4f}, null condition {losses['null']:.4f}", flush=True)

    colours = colour_accuracy(pipe, heldout(args.n_prompts, args.seed, max_res), args)
    print(f"colour named in the prompt = dominant shape colour: {colours['colour_accuracy']:.1%} of "
          f"{args.n_prompts} prompts (background colour: {colours['background_accuracy']:.1%}; shape named = shape "
          f"drawn: {colours['shape_accuracy']:.1%})", flush=True)
    if args.save_grid:
        from sd3.sample.images import make_grid

        make_grid([im.resize((64, 64)) for im in colours["images"]], columns=8).save(args.save_grid)
        print(args.save_grid)

    print_result({
        "bench": "learn", "checkpoint": str(args.checkpoint), "dtype": args.dtype, "heldout_seed": args.seed,
        "n_loss": args.n_loss, "loss_true": round(losses["true"], 5), "loss_shuffled": round(losses["shuffled"], 5),
        "loss_null": round(losses["null"], 5),
        "loss_ratio_shuffled_over_true": round(losses["shuffled"] / losses["true"], 4),
        "n_prompts": args.n_prompts, "colour_accuracy": round(colours["colour_accuracy"], 4),
        "background_accuracy": round(colours["background_accuracy"], 4),
        "shape_accuracy": round(colours["shape_accuracy"], 4), "sampler": args.sampler,
        "steps": args.steps, "cfg": args.cfg, "seconds": round(time.perf_counter() - start, 1),
    })
    return 0
