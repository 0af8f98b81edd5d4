"""`sd3 info --config NAME [--height H --width W] [--section.key=value ...]`: size and cost of a configured model.

Prints the parameter count, the estimated training FLOPs per image at a resolution, the attention backend
and the resolved config. The model is built on the meta device, so sizing the 1.2B model allocates nothing.
"""

from __future__ import annotations

import argparse
import json

import torch

from sd3.config_loader import load_config
from sd3.errors import UserError
from sd3.model import build_model
from sd3.model.attention import resolve_backend
from sd3.model.flops import count_parameters, image_tokens, train_flops_per_image


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset name (sd3/configs) or path to a TOML file")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the preset's sample.height)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the preset's sample.width)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def human(value: float, units: list[str]) -> str:
    """1249899331 -> '1.250 B' with units for powers of 1000."""
    power = 0
    while abs(value) >= 1000 and power < len(units) - 1:
        value, power = value / 1000, power + 1
    return f"{value:.3f}{units[power]}"


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    height = args.height or cfg.sample.height
    width = args.width or cfg.sample.width
    try:
        tokens = image_tokens(cfg.model, height, width)
    except ValueError as e:  # a size the patch grid does not divide
        raise UserError(str(e)) from None
    with torch.device("meta"):
        model = build_model(cfg.model)
    # The backend a bf16 model on this machine's training device would use (the meta device has none).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = resolve_backend(cfg.model.attention_backend, torch.empty(0, device=device, dtype=torch.bfloat16))
    info = {
        "config": args.config,
        "parameters": count_parameters(model),
        "height": height,
        "width": width,
        "image_tokens": tokens,
        "text_tokens": 2 * cfg.model.text_tokens,
        "train_flops_per_image": train_flops_per_image(cfg.model, height, width),
        "attention_backend": backend,
    }
    if args.json:
        print(json.dumps({**info, "resolved_config": cfg.to_dict()}, sort_keys=True))
        return 0
    print(f"config            {args.config}")
    print(f"parameters        {info['parameters']:,} ({human(info['parameters'], ['', ' K', ' M', ' B'])})")
    print(f"resolution        {height}x{width} px: {tokens} image tokens + {info['text_tokens']} text tokens")
    flop_units = [" FLOP", " kFLOP", " MFLOP", " GFLOP", " TFLOP", " PFLOP"]
    print(f"train FLOPs/image {info['train_flops_per_image']:.4g} ({human(info['train_flops_per_image'], flop_units)})")
    print(f"attention backend {backend}")
    print("resolved config:")
    print(cfg.to_json())
    return 0
