import dataclasses
import typing

import pytest

from sd3.cli import main
from sd3.config import Config
from sd3.config_loader import config_from_dict, load_config, preset_names
from sd3.errors import ConfigError


def test_presets_load_and_roundtrip():
    assert {"tiny-cpu", "sd3-1b-256", "sd3-1b-512", "sd3-1b-1024"} <= set(preset_names())
    for name in preset_names():
        cfg = load_config(name)
        assert config_from_dict(cfg.to_dict()) == cfg


def test_stage_values_follow_the_source_readme():
    s256, s512, s1024 = (load_config(f"sd3-1b-{r}") for r in (256, 512, 1024))
    assert (s256.data.batch_size, s512.data.batch_size, s1024.data.batch_size) == (140, 40, 15)
    assert (s256.model.max_res, s512.model.max_res, s1024.model.max_res) == (256, 512, 1024)
    assert s256.model.max_res_orig == s512.model.max_res_orig == s1024.model.max_res_orig == 256
    assert s256.model.dim == 64 * s256.model.num_blocks and s256.model.num_heads == s256.model.num_blocks
    t = s256.train
    assert (t.lr, t.warmup_steps, t.ema_update_every, t.ema_decay, t.accumulation_steps) == (1e-4, 1000, 100, 0.99, 2)
    assert (t.null_prob_pooled, t.null_prob_gemma, t.null_prob_bert) == (0.1, 0.316, 0.316)


def test_overrides_are_typed():
    overrides = ["--train.lr=3e-4", "--topology.loader_to_model={0: [1, 2]}", "--model.text_dims=[8,4]"]
    cfg = load_config("tiny-cpu", overrides)
    assert cfg.train.lr == 3e-4
    assert cfg.topology.loader_to_model == {"0": [1, 2]}
    assert cfg.model.text_dims == [8, 4]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.lr=abc", "'train.lr' expects float"),
        ("--train.nope=1", "unknown config key 'train.nope'"),
        ("--nope.x=1", "unknown config key 'nope.x'"),
        ("--model.num_blocks=2.5", "'model.num_blocks' expects int"),
        ("--train.deterministic=1", "'train.deterministic' expects bool"),
    ],
)
def test_bad_override_names_key_and_type(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-cpu", [override])


def test_cli_bad_key_exits_2_with_one_line(capsys):
    assert main(["info", "--config", "tiny-cpu", "--model.bogus=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.bogus" in err


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="no-such-preset"):
        load_config("no-such-preset")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--topology.mode=ring", "'topology.mode' is 'ring', not one of loader, hybrid, colocated, cached"),
        ("--train.precision=fp13", "'train.precision' is 'fp13', not one of auto, bf16, fp16, fp32"),
        ("--model.positional_encoding=RoPE3d", "'model.positional_encoding' is 'RoPE3d', not one of RoPE2d"),
        ("--train.total_steps=-5", "'train.total_steps' is -5, expected >= 1"),
        ("--data.batch_size=0", "'data.batch_size' is 0, expected >= 1"),
        ("--train.null_prob_bert=1.5", r"'train.null_prob_bert' is 1.5, expected in \[0, 1\]"),
        ("--model.text_dims=[64,0]", r"'model.text_dims' is \[64, 0\], expected >= 1"),
        ("--model.num_heads=3", "'model.dim' is 128, not a multiple of model.num_heads"),
    ],
)
def test_choices_and_ranges_fail_at_load_naming_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-cpu", [override])


def test_every_choice_field_is_a_literal_whose_default_is_a_choice():
    """A bare `str` with its options in a comment would escape the one check; a default outside its Literal would
    be a config no load could produce."""
    cfg = Config()
    literals = 0
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        for name, hint in typing.get_type_hints(type(part)).items():
            if typing.get_origin(hint) is typing.Literal:
                literals += 1
                assert getattr(part, name) in typing.get_args(hint), f"{section.name}.{name}"
    assert literals >= 13


def test_checkpoint_config_is_checked_too():
    tree = load_config("tiny-cpu").to_dict()
    tree["train"]["precision"] = "fp13"
    with pytest.raises(ConfigError, match="config.json: config key 'train.precision' is 'fp13'"):
        config_from_dict(tree, source="config.json")


@pytest.mark.parametrize("override", ["--train.precision=fp13", "--train.total_steps=-5", "--data.batch_size=0"])
def test_cli_range_errors_exit_2_at_parse_time(override, capsys):
    assert main(["info", "--config", "tiny-cpu", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and override.split("=")[0].lstrip("-") in err
