"""make-tiny writes the hub layouts, with tokenizers the normal loading code reads, deterministically."""

from __future__ import annotations

import json

from safetensors.torch import load_file
from transformers import AutoTokenizer

from sd3.cli import main as cli_main

FOLDERS = ("metaclip", "gemma", "modernbert", "flux/vae")


def test_layout_and_tokenizers(tiny_models):
    root = tiny_models.root
    for folder in FOLDERS:
        assert (root / folder / "config.json").is_file() and (root / folder / "model.safetensors").is_file() or \
            (root / folder / "diffusion_pytorch_model.safetensors").is_file()
    vae_config = json.loads((root / "flux/vae/config.json").read_text())
    assert vae_config["latent_channels"] == 16 and len(vae_config["block_out_channels"]) == 4
    assert vae_config["_class_name"] == "AutoencoderKL"
    gemma = AutoTokenizer.from_pretrained(root / "gemma")
    ids = gemma(["Red circle, top left.", "a zebra"])["input_ids"]
    assert ids[0][0] == gemma.bos_token_id == 2 and gemma.unk_token_id not in ids[1]  # characters cover any word
    bert = AutoTokenizer.from_pretrained(root / "modernbert")
    ids = bert("green star")["input_ids"]
    assert ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id and len(ids) == 4


def test_same_seed_same_models(tiny_models, tmp_path):
    assert cli_main(["make-tiny", "--out", str(tmp_path)]) == 0
    for folder in ("metaclip", "gemma", "modernbert"):
        a = load_file(tiny_models.root / folder / "model.safetensors")
        b = load_file(tmp_path / folder / "model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    a = load_file(tiny_models.root / "flux/vae/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "flux/vae/diffusion_pytorch_model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    other = tmp_path / "seed1"
    assert cli_main(["make-tiny", "--out", str(other), "--seed", "1"]) == 0
    c = load_file(other / "gemma" / "model.safetensors")
    assert not all((c[k] == load_file(tmp_path / "gemma" / "model.safetensors")[k]).all() for k in c)
