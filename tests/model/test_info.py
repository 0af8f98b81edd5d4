import json

import pytest
import torch
from torch import nn

from model.tiny import tiny_config
from sd3.cli import main
from sd3.config_loader import load_config
from sd3.model import build_model
from sd3.model.flops import count_parameters, matmul_weights, train_flops_per_image


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_flops_weight_count_matches_the_built_model(mlp):
    """The FLOPs estimate counts every matmul weight of the real network, no more, no less."""
    cfg = tiny_config(mlp_type=mlp)
    model = build_model(cfg)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert matmul_weights(cfg).total == weights


def test_flops_grow_with_resolution():
    cfg = tiny_config()
    small, large = train_flops_per_image(cfg, 64, 64), train_flops_per_image(cfg, 128, 128)
    assert 3 * small < large  # 4x the image tokens, attention grows faster, text stays
    with pytest.raises(ValueError, match="width 72 px"):
        train_flops_per_image(cfg, 64, 72)


def test_reference_size_is_about_1_2_billion():
    with torch.device("meta"):
        model = build_model(load_config("sd3-1b-256").model)
    assert 1.1e9 <= count_parameters(model) <= 1.3e9


def test_info_json_on_tiny_cpu(capsys):
    assert main(["info", "--config", "tiny-cpu", "--height", "64", "--width", "96", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = load_config("tiny-cpu")
    assert info["parameters"] == count_parameters(build_model(cfg.model))
    assert info["image_tokens"] == 4 * 6 and info["text_tokens"] == 2 * cfg.model.text_tokens
    assert info["train_flops_per_image"] == train_flops_per_image(cfg.model, 64, 96)
    assert info["attention_backend"] == "sdpa"
    assert info["resolved_config"]["model"]["dim"] == cfg.model.dim


def test_info_text_applies_overrides(capsys):
    assert main(["info", "--config", "tiny-cpu", "--model.num_blocks=2"]) == 0
    out = capsys.readouterr().out
    count = count_parameters(build_model(load_config("tiny-cpu", ["--model.num_blocks=2"]).model))
    assert f"parameters        {count:,}" in out
    assert '"num_blocks": 2' in out


def test_info_bad_resolution_is_one_line(capsys):
    assert main(["info", "--config", "tiny-cpu", "--height", "70"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["sd3 info: error: height 70 px is not a multiple of 16 px"]


SWITCH_OVERRIDES = [
    "--model.attention=cosine", "--model.positional_encoding=RoPE", "--model.positional_encoding=RoPE2dV2",
    "--model.kv_merge_attn=true", "--model.qk_half_dim=true", "--model.text_loss=true",
    "--model.time_embedding=seed", "--model.head_modulation=seed", "--model.rope_interpolate=false",
]


@pytest.mark.parametrize("override", SWITCH_OVERRIDES)
def test_info_runs_with_each_switch(capsys, override):
    assert main(["info", "--config", "tiny-cpu", override, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    key, value = override[2:].split("=")
    assert str(info["resolved_config"]["model"][key.split(".")[1]]).lower() == value.lower()
    cfg = load_config("tiny-cpu", [override]).model
    assert info["parameters"] == count_parameters(build_model(cfg))


def test_info_names_a_bad_choice(capsys):
    assert main(["info", "--config", "tiny-cpu", "--model.attention=linear"]) == 2
    assert "config key 'model.attention' is 'linear', not one of softmax, cosine" in capsys.readouterr().err


@pytest.mark.parametrize("override", SWITCH_OVERRIDES)
def test_flops_weight_count_matches_with_each_switch(override):
    cfg = load_config("tiny-cpu", [override]).model
    model = build_model(cfg)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert matmul_weights(cfg).total == weights
