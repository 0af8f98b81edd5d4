"""Loading errors are one line naming the config key; the hub token is used but never written anywhere."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import requests
from huggingface_hub.errors import GatedRepoError

from sd3.encoders.hub import EncoderLoadError, hub_token, load_pretrained, resolve_dtype
from sd3.encoders.text import TextEncoders
from sd3.encoders.vae import LatentVAE

DUMMY_TOKEN = "hf_DummyTokenForTests0123456789abcdef"


def test_missing_local_path_names_the_key(tiny_cfg, tmp_path):
    missing = tmp_path / "no-such-gemma"
    enc = dataclasses.replace(tiny_cfg.encoders, gemma=str(missing))
    with pytest.raises(EncoderLoadError) as info:
        TextEncoders.load(enc, 8, "cpu")
    message = str(info.value)
    assert "\n" not in message and "encoders.gemma" in message and str(missing) in message


def test_unreachable_hub_id_names_the_key():
    """HF_HUB_OFFLINE=1 (tests/conftest.py): a hub id that is not cached cannot be fetched."""
    with pytest.raises(EncoderLoadError) as info:
        LatentVAE.load("sd3-tests/no-such-vae", "vae", "cpu", "fp32")
    message = str(info.value)
    assert "\n" not in message and message.startswith("encoders.vae:") and "sd3-tests/no-such-vae" in message


def test_gated_repo_says_accept_licence_and_set_token():
    response = requests.Response()
    response.status_code = 403

    def gated_load(path, **kwargs):
        try:
            raise GatedRepoError("Access to model google/gemma-2-2b is restricted.", response=response)
        except GatedRepoError as e:  # transformers re-raises hub errors as OSError
            raise OSError(f"You are trying to access a gated repo.\nMake sure to have access to {path}.") from e

    with pytest.raises(EncoderLoadError) as info:
        load_pretrained(gated_load, "encoders.gemma", "google/gemma-2-2b")
    message = str(info.value)
    assert "\n" not in message and "licence" in message and "HF_TOKEN" in message and ".env" in message


def test_token_comes_from_dotenv(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    assert hub_token() is None
    (tmp_path / ".env").write_text(f"HF_TOKEN={DUMMY_TOKEN}\n")
    assert hub_token() == DUMMY_TOKEN
    seen = {}
    load_pretrained(lambda path, **kw: seen.update(kw), "encoders.clip", "x")
    assert seen == {"token": DUMMY_TOKEN}


def test_bad_dtype_name():
    with pytest.raises(EncoderLoadError, match="bf16"):
        resolve_dtype("bfloat8")


def test_token_reaches_nothing_written(tiny_models, tmp_path, monkeypatch, caplog, capsys):
    """With HF_TOKEN in .env and the environment: make-tiny's files, the conditioner's logs and its Batch
    (what a loader sends) and saved config never contain the token."""
    import numpy as np
    import torch

    from sd3.cli import main as cli_main
    from sd3.config_loader import load_config
    from sd3.data.batches import RawBatch
    from sd3.encoders.conditioner import Conditioner

    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(f"HF_TOKEN={DUMMY_TOKEN}\n")
    monkeypatch.setenv("HF_TOKEN", DUMMY_TOKEN)
    caplog.set_level(logging.DEBUG)
    assert cli_main(["make-tiny", "--out", str(tmp_path / "models")]) == 0
    overrides = [o.replace(str(tiny_models.root), str(tmp_path / "models")) for o in tiny_models.overrides]
    cfg = load_config("tiny-cpu", overrides)
    conditioner = Conditioner(cfg, "cpu")
    raw = RawBatch(torch.zeros(2, 3, 32, 32), ["red circle", "blue star"], np.arange(2), {})
    batch = conditioner(raw, torch.Generator().manual_seed(0))
    (tmp_path / "config.json").write_text(cfg.to_json())
    torch.save({"batch": batch.tensors()}, tmp_path / "batch.pt")

    written = [p for p in (tmp_path / "models").rglob("*") if p.is_file()]
    written += [tmp_path / "config.json", tmp_path / "batch.pt"]
    assert len(written) > 10
    out, err = capsys.readouterr()
    for text in [out, err, caplog.text]:
        assert DUMMY_TOKEN not in text
    for path in written:
        assert DUMMY_TOKEN.encode() not in path.read_bytes(), path
