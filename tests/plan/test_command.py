"""`sd3 plan`: the table and JSON line on tiny-cpu (its local tiny models) and the presets; bad input exits 2."""

from __future__ import annotations

import json

import pytest

from sd3.cli import main


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_plan_tiny_cpu_counts_the_configured_tiny_models(tiny_models, capsys):
    assert main(["plan", "--config", "tiny-cpu", *tiny_models.overrides]) == 0
    out = capsys.readouterr().out
    figures = last_json(out)
    assert "layouts per node" in out and figures["configured_layout"] == "1+2 (1x1:2)"
    # The tiny models, not the shipped real ones: a 64-wide Gemma is a few MFLOP per caption, not 313 G.
    assert 0 < figures["gemma_flops_per_image"] < 1e9
    assert figures["recommended_stall_pct"] <= figures["predicted_stall_pct"]
    assert {"predicted_stall_pct", "recommended_stall_pct", "recommended_overrides"} <= set(figures)


def test_plan_preset_predicts_the_source_layout_and_a_balanced_one(capsys):
    assert main(["plan", "--config", "sd3-1b-512", "--gpu", "h200", "--plan.vae_efficiency=0.2"]) == 0
    figures = last_json(capsys.readouterr().out)
    assert figures["configured_layout"] == "2+6 (2x1:3)" and figures["gpu"] == "h200"
    assert figures["vae_flops_per_image"] == pytest.approx(1118e9, rel=0.02)
    assert figures["predicted_stall_pct"] > 5.0 >= figures["recommended_stall_pct"]


@pytest.mark.parametrize("argv,culprit", [
    (["--gpu", "tpu9"], "plan.gpu"),
    (["--plan.vae_efficiency=2"], "plan.vae_efficiency"),
    (["--plan.nope=1"], "plan.nope"),
    (["--height", "100"], "--height"),
    (["--encoders.gemma=google/gemma-7b"], "encoders.gemma"),
])
def test_bad_input_is_one_line_naming_the_culprit(argv, culprit, capsys):
    assert main(["plan", "--config", "sd3-1b-256", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and culprit in err
