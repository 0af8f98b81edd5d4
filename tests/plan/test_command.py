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


@pytest.mark.slow
def test_bench_gpu_tiny_feeds_plan_measured(tiny_models, tmp_path, capsys):
    """`sd3 bench gpu --tiny` (its CPU code path: real-width 1-layer encoders, the tiny MMDiT) ends in one JSON
    line; `sd3 plan --measured` reads that line and times every part with its achieved FLOP/s."""
    assert main(["bench", "gpu", "--tiny", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    bench = last_json(out)
    achieved = bench["plan_measure_achieved_flops_per_s"]
    assert set(achieved) == {"gemma", "bert", "clip", "vae", "mmdit"} and all(v > 0 for v in achieved.values())
    assert bench["device"] == "cpu" and bench["attention_backend"] == "sdpa" and bench["mmdit_step_s_64_eager"] > 0
    assert bench["gemma_images_per_s"] > 0 and bench["vae_64_images_per_s"] > 0
    (tmp_path / "bench_gpu.txt").write_text(out)

    assert main(["plan", "--config", "tiny-cpu", *tiny_models.overrides, "--measured",
                 str(tmp_path / "bench_gpu.txt")]) == 0
    plan = last_json(capsys.readouterr().out)
    assert plan["source"] == "measured"
    for part in ("gemma", "bert", "clip", "vae"):
        assert plan[f"{part}_s_per_image"] == pytest.approx(plan[f"{part}_flops_per_image"] / achieved[part])

    (tmp_path / "other.txt").write_text('{"bench": "model"}\n')
    for path, culprit in ((tmp_path / "other.txt", "no `sd3 bench gpu` JSON line"), (tmp_path / "nope", "nope")):
        assert main(["plan", "--config", "tiny-cpu", *tiny_models.overrides, "--measured", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and culprit in err and str(path) in err
