"""`sd3 import-seed --weights model_ema_XXXs.pkl --params model_params_XXXs.json --out DIR`: a source checkpoint
(gmongaras/Stable-Diffusion-3-From-Scratch, SEED_SPEC §g) as one of ours, which `sd3 sample --checkpoint DIR` loads.

The .pkl is read with torch.load(weights_only=True): the source saved plain state_dicts, and anything else (a
pickled module, arbitrary objects) is refused rather than executed. The converted weights go into both
model.safetensors and ema.safetensors of DIR/step-XXXXXXXX (S from the file name or the json's start_step), with
a config whose [model] reproduces the source network and whose encoders use its latent normalisation.
The released 1.2B checkpoints cannot be downloaded here; the conversion is tested on a synthetic state_dict.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
from pathlib import Path

import torch

from sd3.config_loader import load_config
from sd3.model import build_model
from sd3.model.seed_checkpoint import SeedCheckpointError, convert, model_config
from sd3.train.checkpoint import save_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True, help="the source's model_ema_{S}s.pkl (or model_{S}s.pkl)")
    parser.add_argument("--params", required=True, help="the source's model_params_{S}s.json")
    parser.add_argument("--out", required=True, help="output save_dir: gets step-XXXXXXXX/ and a 'latest' file")
    parser.add_argument("--config", default="sd3-1b-256",
                        help="preset for everything but [model] (encoders, sample defaults); default sd3-1b-256")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain {name: tensor} state_dict from a torch.save file, or SeedCheckpointError (one line)."""
    if not path.is_file():
        raise SeedCheckpointError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SeedCheckpointError(f"--weights {path}: not a plain state_dict (torch.load weights_only refused: "
                                  f"{reason[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise SeedCheckpointError(f"--weights {path}: not a plain state_dict of tensors (got {type(state).__name__})")
    return state


def read_params(path: Path) -> dict:
    try:
        params = json.loads(path.read_text())
    except FileNotFoundError:
        raise SeedCheckpointError(f"--params {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise SeedCheckpointError(f"--params {path}: invalid JSON: {e}") from None
    if not isinstance(params, dict):
        raise SeedCheckpointError(f"--params {path}: expected a JSON object of constructor arguments")
    return params


def source_step(weights: Path, params: dict) -> int:
    found = re.search(r"_(\d+)s\.pkl$", weights.name)
    return int(found.group(1)) if found else int(params.get("start_step", 0))


def main(args: argparse.Namespace) -> int:
    weights, params_path = Path(args.weights), Path(args.params)
    try:
        params = read_params(params_path)
        state = read_state_dict(weights)
        cfg = load_config(args.config, getattr(args, "overrides", []))
        cfg.model = model_config(params, cfg.model)
        cfg.encoders.latent_norm = "seed"
        cfg.sample.width = cfg.sample.height = cfg.model.max_res
        converted = convert(state, cfg.model)
        with torch.device("meta"):
            expected = build_model(cfg.model).state_dict()
        wrong = [k for k in expected.keys() | converted.keys()
                 if k not in expected or k not in converted or expected[k].shape != converted[k].shape]
        if wrong:
            key = sorted(wrong)[0]
            shapes = [tuple(d[key].shape) if key in d else "absent" for d in (converted, expected)]
            raise SeedCheckpointError(f"converted '{key}' is {shapes[0]}, the model of model_params json expects "
                                      f"{shapes[1]} ({len(wrong)} such tensors)")
    except SeedCheckpointError as e:
        print(f"sd3 import-seed: error: {e}", file=sys.stderr)
        return 2
    step = source_step(weights, params)
    meta = {"source": "gmongaras/Stable-Diffusion-3-From-Scratch", "source_weights": str(weights),
            "source_params": params, "imported": True}
    path = save_checkpoint(args.out, step, converted, converted, {"step": step}, cfg.to_dict(), meta, keep_last=0)
    print(f"wrote {path} ({sum(t.numel() for t in converted.values()):,} parameters, step {step})")
    print(json.dumps({"checkpoint": str(path), "step": step, "parameters": sum(t.numel() for t in converted.values())}))
    return 0
