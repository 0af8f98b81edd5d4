"""`sd3 export --checkpoint DIR --out FOLDER [--dtype bf16] [--push-to-hub REPO_ID]`: a hub-ready model folder.

The folder (layout in sd3/sample/pretrained.py) holds the EMA weights in safetensors, loads with
`Pipeline.from_pretrained(FOLDER_OR_HUB_ID)` and with `MMDiT.from_pretrained(...)` (huggingface_hub's
PyTorchModelHubMixin: two files, no code to register, hub download and caching for free; diffusers' ModelMixin
would need every constructor argument as a JSON keyword instead of our ModelConfig), and has a model card with the
training config, steps, images seen and the run's last validation grid. `--push-to-hub` uploads it with
huggingface_hub, using HF_TOKEN from `.env` (or the environment). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from dotenv import dotenv_values
from huggingface_hub import HfApi

from sd3.config import Config
from sd3.config_loader import config_from_dict
from sd3.devices import resolve_dtype
from sd3.eval.validation import sample_dir
from sd3.sample.checks import find_checkpoint
from sd3.sample.pipeline import build_in_dtype, load_weights
from sd3.sample.pretrained import ENCODERS_FILE, MODEL_CONFIG_FILE, SD3_CONFIG_FILE, WEIGHTS_FILE
from sd3.train.checkpoint import CONFIG_FILE, EMA_FILE, META_FILE
from sd3.train.secrets import scrub_secrets

GRID_FILE = "validation.png"


class ExportError(ValueError):
    """Bad input to `sd3 export`; the message is one line naming the culprit (exit 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a step-XXXXXXXX checkpoint dir, or a save_dir with 'latest'")
    parser.add_argument("--out", required=True, help="the folder to write (created; an earlier export is replaced)")
    parser.add_argument("--dtype", default="bf16", help="fp32 | bf16 | fp16: the dtype of the exported weights")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the folder to this hub repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")


def main(args: argparse.Namespace) -> int:
    try:
        folder = export(args.checkpoint, args.out, args.dtype)
        url = push(folder, args.push_to_hub, args.private) if args.push_to_hub else None
    except (ExportError, FileNotFoundError) as e:
        print(f"sd3 export: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(folder), "dtype": args.dtype, "files": sorted(p.name for p in folder.iterdir()),
                      "pushed": url}), flush=True)
    return 0


def export(checkpoint: str | Path, out: str | Path, dtype: str = "bf16") -> Path:
    """Write the export folder of `checkpoint`'s EMA weights in `dtype`; returns the folder."""
    path = find_checkpoint(checkpoint)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / SD3_CONFIG_FILE).is_file():
        raise ExportError(f"--out {out} exists, is not empty and is not an earlier export: choose another folder")
    try:
        torch_dtype = resolve_dtype(dtype, "--dtype")
    except ValueError as e:
        raise ExportError(str(e)) from None
    cfg = config_from_dict(json.loads((path / CONFIG_FILE).read_text()), source=str(path / CONFIG_FILE))
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model = build_in_dtype(cfg, torch.device("cpu"), torch_dtype)
    load_weights(model, path / EMA_FILE)  # fp32 EMA -> dtype, rounded once, as `sd3 sample` rounds it
    model.save_pretrained(out)  # model.safetensors + config.json (the mixin's)
    config_dict = scrub_secrets(cfg.to_dict())[0]
    (out / SD3_CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    encoders = {k: getattr(cfg.encoders, k) for k in ("clip", "gemma", "bert", "vae", "vae_subfolder")}
    (out / ENCODERS_FILE).write_text(json.dumps(encoders, indent=2) + "\n")
    grid = last_grid(path)
    if grid is not None:
        shutil.copyfile(grid, out / GRID_FILE)
    (out / "README.md").write_text(model_card(cfg, config_dict, meta, path, encoders, dtype, grid is not None,
                                              sum(p.numel() for p in model.parameters())))
    missing = [f for f in (WEIGHTS_FILE, MODEL_CONFIG_FILE) if not (out / f).is_file()]
    if missing:  # the mixin's file names are what MMDiT.from_pretrained and pretrained.py read
        raise RuntimeError(f"save_pretrained did not write {missing} into {out}")
    return out


def last_grid(checkpoint: Path) -> Path | None:
    """The newest validation grid of the run the checkpoint belongs to, up to the checkpoint's step."""
    step = int(checkpoint.name.rsplit("-", 1)[-1]) if checkpoint.name.startswith("step-") else None
    grids = sorted(sample_dir(checkpoint.parent).glob("step-*.png"))
    grids = [g for g in grids if step is None or int(g.stem.rsplit("-", 1)[-1]) <= step]
    return grids[-1] if grids else None


def model_card(cfg: Config, config_dict: dict, meta: dict, checkpoint: Path, encoders: dict, dtype: str,
               has_grid: bool, parameters: int) -> str:
    """README.md: hub metadata, what was trained and how long, how to load it, the validation grid, the config."""
    t = cfg.train
    lines = [
        "---", "library_name: sd3", "pipeline_tag: text-to-image",
        "tags:", "- text-to-image", "- mmdit", "- rectified-flow", "- sd3", "---", "",
        "# MMDiT text-to-image model (sd3)", "",
        f"A {parameters / 1e6:.1f}M-parameter SD3-style MMDiT ({cfg.model.num_blocks} blocks, width {cfg.model.dim}) "
        f"trained with rectified flow; these are its EMA weights (decay {t.ema_decay}) in {dtype}.", "",
        "## Training", "",
        f"- steps: {meta.get('step', 'unknown')} (of {t.total_steps} planned)",
        f"- images seen: {meta.get('images', 'unknown')} (by model rank 0; "
        f"batch {cfg.data.batch_size} per rank x {t.accumulation_steps} accumulation steps)",
        f"- resolution: up to {cfg.model.max_res} px; data: `{cfg.data.parquet_folder}`",
        f"- optimizer: AdamW lr {t.lr}, {t.lr_schedule} schedule, warm-up {t.warmup_steps}, precision {t.precision}",
        f"- source checkpoint: `{checkpoint.name}`, wandb run `{meta.get('wandb_run_id', 'none')}`", "",
        "## Encoders (not included; loaded by id)", "",
        *[f"- {k}: `{v}`" for k, v in encoders.items()], "",
        "## Use", "",
        "```python",
        "from sd3.sample.pipeline import Pipeline",
        "",
        'pipe = Pipeline.from_pretrained("THIS_FOLDER_OR_REPO_ID")',
        f'image = pipe("{cfg.validation.prompts[0] if cfg.validation.prompts else "a photo"}", seed=0).images[0]',
        "```", "",
        "The network alone: `MMDiT.from_pretrained(\"THIS_FOLDER_OR_REPO_ID\")` (`sd3.model.mmdit`).", "",
    ]
    if has_grid:
        lines += ["## Last validation grid", "", f"![validation grid]({GRID_FILE})", ""]
    lines += ["## Training config", "", "```json", json.dumps(config_dict, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def hub_token(env_file: str | Path = ".env") -> str:
    """HF_TOKEN from `.env` in the working directory, else from the environment."""
    token = dotenv_values(env_file).get("HF_TOKEN") if Path(env_file).is_file() else None
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise ExportError("--push-to-hub needs HF_TOKEN in .env or the environment (a write token from "
                          "https://huggingface.co/settings/tokens)")
    return token


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Create the model repo if needed and upload the folder as one commit; returns the repo's URL."""
    api = HfApi(token=hub_token())
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    run = json.loads((folder / SD3_CONFIG_FILE).read_text())["train"]["save_dir"]
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                      commit_message=f"sd3 export of {run}")
    return str(url)
