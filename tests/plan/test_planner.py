"""The planner's cheaper-loader options: trimmed text on a caption-length mix, and hybrid mode (no VAE, a cache read)"""

from __future__ import annotations

import pytest

from sd3.config_loader import load_config
from sd3.errors import ConfigError
from sd3.plan.planner import count_costs, make_plan, plan_summary
from sd3.plan.settings import PlanSettings, apply_plan_overrides


def plan(overrides: list[str], settings: PlanSettings | None = None, preset: str = "sd3-1b-256") -> dict:
    settings = settings or PlanSettings()
    cfg = load_config(preset, overrides)
    return plan_summary(make_plan(cfg, settings, cfg.model.max_res, cfg.model.max_res))


def test_hybrid_replaces_the_vae_by_a_cache_read_and_feeds_the_source_layout():
    online, hybrid = plan([]), plan(["--topology.mode=hybrid"])
    assert hybrid["hybrid"] and "vae_flops_per_image" not in hybrid and online["vae_flops_per_image"] > 0
    assert hybrid["cache_bytes_per_image"] == 64 * 1024  # 2 x 16 x 32 x 32 bf16 at 256 px (sd3/data/latents.py)
    assert hybrid["cache_read_s_per_image"] == pytest.approx(64 * 1024 / 1e9)
    assert hybrid["loader_s_per_image"] == pytest.approx(
        online["loader_s_per_image"] - online["vae_s_per_image"] + hybrid["cache_read_s_per_image"])
    # Issue 13's goal: the source's 2+6 node stalls at most 5 % once the VAE leaves the loader.
    assert hybrid["configured_layout"] == "2+6 (2x1:3)" and hybrid["predicted_stall_pct"] <= 5.0
    assert online["predicted_stall_pct"] > 5.0


def test_a_latent_cache_in_loader_mode_plans_as_hybrid():
    # The producer reads the cache whenever data.latent_cache is set, so the plan must as well.
    assert plan(["--data.latent_cache=/somewhere"])["hybrid"]


def test_trimmed_text_costs_the_mix_and_untrimmed_the_steps_longest():
    trimmed, untrimmed = plan([]), plan(["--encoders.trim_text=false"])
    full = plan([], PlanSettings(captions="full"))
    # 50/50 of ~60 and ~15 tokens: trimmed pays a little above the 37.5-token mean, untrimmed each step's longest.
    assert 37.5 < trimmed["gemma_tokens_per_caption"] < 45 < untrimmed["gemma_tokens_per_caption"] < 77
    assert full["gemma_tokens_per_caption"] == 77 and full["clip_tokens_per_caption"] == 77
    assert full["gemma_flops_per_image"] == pytest.approx(313e9, rel=0.02)  # issue 12's table
    # Text FLOPs follow the token positions (projections and MLPs are linear in them; attention is small here).
    ratio = trimmed["gemma_tokens_per_caption"] / full["gemma_tokens_per_caption"]
    assert trimmed["gemma_flops_per_image"] / full["gemma_flops_per_image"] == pytest.approx(ratio, rel=0.03)
    assert trimmed["predicted_stall_pct"] < untrimmed["predicted_stall_pct"] < full["predicted_stall_pct"]


def test_each_text_forward_pays_its_fixed_cost_once_per_micro_batch():
    """plan.text_forward_overhead_s: untrimmed one forward per loader step, trimmed one per micro-batch (a loader
    step of the preset's 2+6 layout: 140 images x 3 model ranks = 420 captions; auto micro-batches of 53 -> 8)."""
    overhead = 0.004
    slow = PlanSettings(text_forward_overhead_s=overhead)
    for overrides, forwards in (([], 8), (["--encoders.trim_text=false"], 1)):
        free, paid = plan(overrides), plan(overrides, slow)
        rows = 420
        assert free["gemma_flops_per_image"] == paid["gemma_flops_per_image"]
        extra = paid["gemma_s_per_image"] - free["gemma_s_per_image"]
        assert extra == pytest.approx(overhead * forwards / rows)
        assert paid["vae_s_per_image"] == free["vae_s_per_image"]


def test_the_caption_mix_is_a_setting():
    settings = PlanSettings()
    rest = apply_plan_overrides(settings, ["--plan.caption_tokens_long=30", "--plan.captions=mix", "--x.y=1"])
    assert rest == ["--x.y=1"] and settings.caption_tokens_long == 30.0
    cfg = load_config("sd3-1b-256", [])
    short = count_costs(cfg, settings, 256, 256)[0]
    assert short.tokens["gemma"] < count_costs(cfg, PlanSettings(), 256, 256)[0].tokens["gemma"]


@pytest.mark.parametrize("item,culprit", [
    ("--plan.captions=some", "plan.captions"),
    ("--plan.cache_read_gb_per_s=0", "plan.cache_read_gb_per_s"),
    ("--plan.caption_tokens_short=-1", "plan.caption_tokens_short"),
    ("--plan.text_forward_overhead_s=-0.1", "plan.text_forward_overhead_s"),
])
def test_bad_plan_settings_name_themselves(item, culprit):
    with pytest.raises(ConfigError, match=culprit):
        apply_plan_overrides(PlanSettings(), [item])
