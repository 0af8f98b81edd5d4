"""`sd3 make-tiny --out DIR`: tiny random-init encoders and a shapes-trained tiny VAE, for offline tests and the quick
start."""

from __future__ import annotations

import argparse
from pathlib import Path

from sd3.encoders.tiny import TINY_VAE_WEIGHTS
from sd3.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="data/tiny-models", help="output folder (default: data/tiny-models)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    parser.add_argument("--vae-weights", default=str(TINY_VAE_WEIGHTS),
                        help="tiny VAE weights to start from (default: the ones shipped in sd3/assets); "
                        "'none' = random")
    parser.add_argument("--train-vae-steps", type=int, default=0,
                        help="train the tiny VAE on synthetic shapes for this many steps, starting from --vae-weights "
                             "(0 = keep the weights as they are)")
    parser.add_argument("--vae-lr", type=float, default=1e-3, help="peak learning rate of the VAE training")
    parser.add_argument("--vae-batch", type=int, default=8, help="images per VAE training step")
    parser.add_argument("--vae-crop", type=int, default=0,
                        help="train on random CROPxCROP crops of the shapes images (cheaper per step; "
                             "default 0 = whole images, which reconstruct whole images best)")
    parser.add_argument("--save-asset", default="",
                        help="with --train-vae-steps: also write the trained VAE weights to this .safetensors file "
                             "(how sd3/assets/tiny_vae.safetensors is made)")


def main(args: argparse.Namespace) -> int:
    from sd3.encoders.tiny import make_tiny

    weights = None if args.vae_weights.lower() == "none" else Path(args.vae_weights)
    if weights is not None and not weights.is_file():
        if args.vae_weights != str(TINY_VAE_WEIGHTS):
            raise UserError(f"--vae-weights {weights} does not exist")
        weights = None
    out = make_tiny(args.out, seed=args.seed, vae_weights=weights)
    if args.train_vae_steps > 0:
        from sd3.encoders.tiny_vae import train_and_install

        psnr = train_and_install(out, steps=args.train_vae_steps, seed=args.seed, asset=args.save_asset or None,
                                 lr=args.vae_lr, batch_size=args.vae_batch, crop=args.vae_crop)
        print(f"tiny VAE trained for {args.train_vae_steps} steps: held-out shapes PSNR {psnr:.2f} dB")
    print(f"tiny models written to {out} (metaclip/, gemma/, modernbert/, flux/vae/)"
          + ("" if weights or args.train_vae_steps else "; the VAE is random (no trained weights)"))
    return 0
