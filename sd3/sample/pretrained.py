"""`Pipeline.from_pretrained(FOLDER_OR_HUB_ID)`: the folder `sd3 export` writes, locally or from the hub.

Layout of an export (hub-ready: the hub mixin's two files first, so `MMDiT.from_pretrained` reads it alone)::

    model.safetensors   the EMA weights in the export dtype (PyTorchModelHubMixin's file name)
    config.json         {"cfg": ModelConfig}: what MMDiT.from_pretrained builds the network from
    sd3_config.json     the run's whole resolved Config (encoders, [sample] defaults, training settings)
    encoders.json       the text encoders' and the VAE's ids, the models a user needs besides this one
    README.md           the model card; validation.png, the run's last validation grid, when it had one
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from huggingface_hub import snapshot_download

from sd3.config_loader import apply_override, config_from_dict
from sd3.devices import resolve_device, resolve_dtype
from sd3.encoders.text import TextEncoders
from sd3.encoders.vae import LatentVAE
from sd3.sample.pipeline import build_in_dtype, drop_vae_encoder, load_weights

WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "config.json"
SD3_CONFIG_FILE = "sd3_config.json"
ENCODERS_FILE = "encoders.json"


def pretrained_folder(folder_or_id: str | Path) -> Path:
    """A local export folder as it is, anything else as a hub repo id fetched by huggingface_hub (cached)."""
    path = Path(folder_or_id)
    if path.is_dir():
        if not (path / SD3_CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{path} is not an `sd3 export` folder (no {SD3_CONFIG_FILE})")
        return path
    return Path(snapshot_download(repo_id=str(folder_or_id)))


def load_pretrained(cls, folder_or_id: str | Path, device: str | torch.device = "auto",
                    dtype: str | torch.dtype = "bf16", overrides: list[str] = (), offload: bool | None = None):
    """An export folder or hub id -> `cls` (a Pipeline). `overrides` repoint encoders (`encoders.vae=PATH`)."""
    folder = pretrained_folder(folder_or_id)
    cfg = config_from_dict(json.loads((folder / SD3_CONFIG_FILE).read_text()), source=str(folder / SD3_CONFIG_FILE))
    for item in overrides:
        apply_override(cfg, item)
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    model = build_in_dtype(cfg, device, dtype)
    load_weights(model, folder / WEIGHTS_FILE)
    load_device = torch.device("cpu") if (offload or (offload is None and device.type != "cpu")) else device
    text = TextEncoders.load(cfg.encoders, cfg.model.text_tokens, load_device)
    vae = LatentVAE.load(cfg.encoders.vae, cfg.encoders.vae_subfolder, load_device, cfg.encoders.vae_dtype,
                         with_decoder=True, latent_norm=cfg.encoders.latent_norm)
    drop_vae_encoder(vae)
    return cls(model, cfg, text, vae, device, dtype, offload)
