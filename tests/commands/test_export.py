"""`sd3 export` on the tiny checkpoint: the folder loads with Pipeline.from_pretrained (same image as `sd3 sample`)
and MMDiT.from_pretrained, the model card, the last validation grid, the hub push up to the upload call, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi
from PIL import Image
from safetensors.torch import load_file

from sd3.cli import main as cli
from sd3.commands.export import export
from sd3.model.mmdit import MMDiT
from sd3.sample.pipeline import Pipeline

PROMPT = "A red circle in the center of a white background."


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    return export(tiny_checkpoint, tmp_path_factory.mktemp("export") / "model", "bf16")


def test_from_pretrained_gives_the_image_sd3_sample_gives(exported, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "samples"
    assert cli(["sample", "--checkpoint", str(tiny_checkpoint), "--prompt", PROMPT, "--seed", "5", "--steps", "3",
                "--width", "48", "--height", "32", "--device", "cpu", "--out", str(out)]) == 0
    [path] = out.glob("5_*.png")
    pipe = Pipeline.from_pretrained(exported, device="cpu", dtype="bf16")
    image = pipe(PROMPT, seed=5, num_steps=3, width=48, height=32).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(path).convert("RGB")))


def test_mmdit_from_pretrained_holds_the_ema_weights(exported, tiny_checkpoint):
    model = MMDiT.from_pretrained(exported)
    ema = load_file(str(tiny_checkpoint / "ema.safetensors"))
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert vars(model.cfg) == config["model"]
    state = model.state_dict()
    assert state.keys() == ema.keys()
    for key, value in ema.items():  # bf16 on disk: the EMA rounded once, as `sd3 sample --dtype bf16` rounds it
        assert torch.equal(state[key], value.to(torch.bfloat16).to(state[key].dtype)), key
    stored = load_file(str(exported / "model.safetensors"))
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.bfloat16}


def test_folder_model_card_and_last_validation_grid(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run / tiny_checkpoint.name)
    (run / "samples").mkdir()
    Image.new("RGB", (8, 8), "red").save(run / "samples" / "step-00000002.png")
    Image.new("RGB", (8, 8), "blue").save(run / "samples" / "step-00000008.png")  # after the checkpoint: not its grid
    folder = export(run / tiny_checkpoint.name, tmp_path / "out", "fp32")
    names = {p.name for p in folder.iterdir()}
    assert names == {"model.safetensors", "config.json", "sd3_config.json", "encoders.json", "README.md",
                     "validation.png"}
    assert Image.open(folder / "validation.png").getpixel((0, 0)) == (255, 0, 0)
    card = (folder / "README.md").read_text()
    meta = json.loads((tiny_checkpoint / "meta.json").read_text())
    assert card.startswith("---\nlibrary_name: sd3\npipeline_tag: text-to-image")
    assert f"- steps: {meta['step']} " in card and f"- images seen: {meta['images']} " in card
    assert "![validation grid](validation.png)" in card and '"total_steps": 4' in card
    encoders = json.loads((folder / "encoders.json").read_text())
    assert encoders["vae"] == json.loads((folder / "sd3_config.json").read_text())["encoders"]["vae"]
    # Exporting again over an earlier export replaces it; over an unrelated folder it refuses (exit 2).
    assert export(run / tiny_checkpoint.name, folder, "bf16") == folder
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli(["export", "--checkpoint", str(tiny_checkpoint), "--out", str(other)]) == 2
    assert (other / "notes.txt").read_text() == "mine"


def test_push_to_hub_uploads_the_folder_with_the_env_token(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create", self.token, repo_id, kw))
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)  # offline: everything up to the network calls is real
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", self.token, kw)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    args = ["export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--push-to-hub", "me/tiny"]
    assert cli(args) == 2 and calls == []  # no token anywhere: one-line error, nothing uploaded
    assert "HF_TOKEN" in capsys.readouterr().err

    (tmp_path / ".env").write_text("HF_TOKEN=hf_test_token\n")
    assert cli(args) == 0
    assert calls[0][:3] == ("create", "hf_test_token", "me/tiny")
    assert calls[1][0] == "upload" and calls[1][1] == "hf_test_token"
    assert calls[1][2]["folder_path"] == str(tmp_path / "out") and calls[1][2]["repo_id"] == "me/tiny"
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["pushed"] == "https://huggingface.co/me/tiny" and "model.safetensors" in report["files"]


def test_bad_input_exits_2(tmp_path, capsys):
    assert cli(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_from_pretrained_takes_a_hub_id_through_snapshot_download(exported, monkeypatch):
    import sd3.sample.pretrained as pretrained

    asked = []
    monkeypatch.setattr(pretrained, "snapshot_download", lambda repo_id: asked.append(repo_id) or str(exported))
    pipe = Pipeline.from_pretrained("me/tiny-sd3", device="cpu", dtype="fp32")
    assert asked == ["me/tiny-sd3"] and pipe.dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="not an `sd3 export` folder"):
        Pipeline.from_pretrained(exported.parent)  # a local folder that is not an export is not sent to the hub
