"""The plan of one configuration: each loader part's and the MMDiT's cost per image, and every node layout's stall.

Costs are FLOPs counted on the real architectures (sd3/plan/counting.py) divided by the FLOP/s each part achieves:
the GPU's bf16 peak × the part's assumed efficiency (PlanSettings), or what `--measure` found on this machine.

The cheaper-loader options of the configuration are planned as the loader runs them:
- text encoders at the expected token positions per caption of a caption-length mix, padded as encoders.trim_text
  and text_micro_batch pad them (sd3/plan/captions.py; plan.captions=full: every caption at the full length), plus
  plan.text_forward_overhead_s per forward (one per step untrimmed, one per micro-batch trimmed);
- hybrid (topology.mode=hybrid, or data.latent_cache set): the VAE leaves the loader, and reading each image's cached
  posterior (sd3/data/latents.py: 2 x C x H/8 x W/8 bf16) at plan.cache_read_gb_per_s takes its place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from sd3.config import Config
from sd3.encoders.text import resolve_micro_batch
from sd3.plan.captions import CaptionMix, forwards_per_step, step_seconds, tokens_per_caption
from sd3.plan.counting import MMDiTFlops, mmdit_flops, part_flops
from sd3.plan.encoders import PARTS, TEXT_PARTS, load_spec, local_folder, text_config, vae_kwargs
from sd3.plan.layout import Prediction, candidate_layouts, configured_layout, predict, recommend
from sd3.plan.settings import PlanSettings

CACHE_BYTES_PER_VALUE = 2  # bf16 mean and std (sd3.data.latents.CACHE_DTYPE)


@dataclass(frozen=True)
class PartCost:
    name: str
    flops_per_image: float
    flops_per_s: float  # achieved (assumed or measured)
    forwards_per_image: float = 0.0  # text parts: forwards per caption, each paying forward_overhead_s
    forward_overhead_s: float = 0.0
    read_s_per_image: float = 0.0  # hybrid's "cache read": time that is neither FLOPs nor forwards

    @property
    def seconds_per_image(self) -> float:
        # One model of a text encoder's time for the planner and `sd3 bench balance`'s prediction (a FLOP is the
        # planner's unit of work, a token position the benchmark's).
        flop_s = 1.0 / self.flops_per_s if self.flops_per_image else 0.0
        return step_seconds(flop_s, self.flops_per_image, self.forwards_per_image,
                            self.forward_overhead_s) + self.read_s_per_image


@dataclass(frozen=True)
class LoaderWork:
    """What one loader does per image: FLOPs per part (no "vae" in hybrid), token positions per caption of each
    text part, each text encoder's forwards per caption, and the bytes of cached posterior it reads (0 unless
    hybrid)."""

    flops: dict[str, float]
    tokens: dict[str, float]
    cache_bytes: int = 0
    forwards_per_caption: float = 0.0

    @property
    def hybrid(self) -> bool:
        return "vae" not in self.flops


@dataclass
class Plan:
    height: int
    width: int
    batch: int
    parts: list[PartCost]
    mmdit: MMDiTFlops
    mmdit_flops_per_s: float
    configured: Prediction
    recommended: Prediction
    layouts: list[Prediction] = field(default_factory=list)
    source: str = "assumed"  # "assumed" (PlanSettings efficiencies) | "measured"
    work: LoaderWork | None = None

    @property
    def loader_s_per_image(self) -> float:
        return sum(p.seconds_per_image for p in self.parts)

    @property
    def model_s_per_image(self) -> float:
        return self.mmdit.executed / self.mmdit_flops_per_s


def uses_latent_cache(cfg: Config) -> bool:
    """Whether the loader reads VAE posteriors instead of running the VAE (what BatchProducer does)."""
    return cfg.topology.mode == "hybrid" or bool(cfg.data.latent_cache)


def text_micro_batch(cfg: Config, rows: int) -> int:
    """Captions per text-encoder forward in a loader step of `rows` captions; 0: untrimmed (one forward)."""
    return resolve_micro_batch(cfg.encoders.text_micro_batch, rows) if cfg.encoders.trim_text else 0


def caption_tokens(cfg: Config, settings: PlanSettings, rows: int) -> dict[str, float]:
    """Expected token positions per caption of each text part, for loader steps of `rows` captions. CLIP reads its
    own window (max_position_embeddings: 77 for Meta-CLIP) whatever model.text_tokens is, as sd3/encoders/text.py
    does."""
    windows = {part: cfg.model.text_tokens for part in TEXT_PARTS}
    windows["clip"] = text_config("clip", folder=local_folder("clip", cfg.encoders)).max_position_embeddings
    if settings.captions == "full":
        return {part: float(window) for part, window in windows.items()}
    mix = CaptionMix.normal(settings.caption_tokens_long, settings.caption_tokens_short,
                            settings.caption_tokens_spread, cfg.data.long_caption_prob)
    micro_batch = text_micro_batch(cfg, rows)
    return {part: tokens_per_caption(mix, rows, window, micro_batch) for part, window in windows.items()}


def text_flops(part: str, tokens: float, folder) -> float:
    """FLOPs per caption at a mean of `tokens` positions: linear between the two whole token counts around it
    (exact for the projections and MLPs; attention's small quadratic term is taken at the mean length)."""
    low, high = max(1, math.floor(tokens)), max(1, math.ceil(tokens))
    at_low = part_flops(part, low, 0, 0, folder=folder)
    if high == low:
        return at_low
    return at_low + (tokens - low) * (part_flops(part, high, 0, 0, folder=folder) - at_low)


def cache_bytes_per_image(cfg: Config, height: int, width: int) -> int:
    """Bytes of one image's cached posterior: mean and std, C x H/8 x W/8 each, bf16 (sd3/data/latents.py)."""
    folder = local_folder("vae", cfg.encoders)
    channels = vae_kwargs(folder=folder)["latent_channels"] if folder else load_spec("vae").values["latent_channels"]
    f = cfg.model.vae_downsample
    return 2 * channels * (height // f) * (width // f) * CACHE_BYTES_PER_VALUE


def count_costs(cfg: Config, settings: PlanSettings, height: int,
                width: int) -> tuple[LoaderWork, MMDiTFlops]:
    """FLOPs per image of each loader part and of the MMDiT at height×width px, as the configuration runs them."""
    rows = cfg.data.batch_size * max(configured_layout(cfg.topology, settings.gpus_per_node).shares or (1,))
    tokens = caption_tokens(cfg, settings, rows)
    flops = {part: text_flops(part, tokens[part], local_folder(part, cfg.encoders)) for part in TEXT_PARTS}
    cache = 0
    if uses_latent_cache(cfg):
        cache = cache_bytes_per_image(cfg, height, width)
    else:
        flops["vae"] = part_flops("vae", 0, height, width, folder=local_folder("vae", cfg.encoders))
    forwards = forwards_per_step(rows, text_micro_batch(cfg, rows)) / rows
    return LoaderWork(flops, tokens, cache, forwards), mmdit_flops(cfg.model, height, width)


def make_plan(cfg: Config, settings: PlanSettings, height: int, width: int,
              achieved: dict[str, float] | None = None,
              counted: tuple[LoaderWork, MMDiTFlops] | None = None) -> Plan:
    """The plan at height×width px. achieved: measured FLOP/s per part and "mmdit" (None: peak × efficiencies).
    counted: FLOP counts from count_costs, when the caller has them already."""
    work, mmdit = counted or count_costs(cfg, settings, height, width)
    source = "assumed" if achieved is None else "measured"
    if achieved is None:
        peak = settings.peak_flops
        achieved = {p: peak * settings.efficiency(p) for p in (*PARTS, "mmdit")}
    parts = [PartCost(p, work.flops[p], achieved[p], work.forwards_per_caption, settings.text_forward_overhead_s)
             if p in TEXT_PARTS else PartCost(p, work.flops[p], achieved[p]) for p in PARTS if p in work.flops]
    if work.hybrid:
        read_s = work.cache_bytes / (settings.cache_read_gb_per_s * 1e9)
        parts.append(PartCost("cache read", 0.0, 0.0, read_s_per_image=read_s))
    l_img = sum(p.seconds_per_image for p in parts)
    m_img = mmdit.executed / achieved["mmdit"]
    batch = cfg.data.batch_size
    layouts = [predict(layout, batch, l_img, m_img) for layout in candidate_layouts(settings.gpus_per_node)]
    configured = predict(configured_layout(cfg.topology, settings.gpus_per_node), batch, l_img, m_img)
    return Plan(height, width, batch, parts, mmdit, achieved["mmdit"], configured,
                recommend(layouts, settings.max_stall_pct), layouts, source, work)


def plan_summary(plan: Plan) -> dict:
    """The figures of a plan as one flat dict (the JSON line of `sd3 plan`)."""
    out = {
        "height": plan.height, "width": plan.width, "batch_size": plan.batch, "source": plan.source,
        "mmdit_model_flops_per_image": plan.mmdit.model, "mmdit_executed_flops_per_image": plan.mmdit.executed,
        "loader_flops_per_image": sum(p.flops_per_image for p in plan.parts),
        "loader_s_per_image": plan.loader_s_per_image, "model_s_per_image": plan.model_s_per_image,
        "loader_to_model_work_ratio": plan.loader_s_per_image / plan.model_s_per_image,
        "configured_layout": plan.configured.layout.name,
        "predicted_stall_pct": plan.configured.stall_pct,
        "predicted_loader_idle_pct": plan.configured.loader_idle_pct,
        "configured_images_per_s_per_gpu": plan.configured.images_per_s_per_gpu,
        "recommended_layout": plan.recommended.layout.name,
        "recommended_overrides": plan.recommended.layout.overrides(),
        "recommended_stall_pct": plan.recommended.stall_pct,
        "recommended_images_per_s_per_gpu": plan.recommended.images_per_s_per_gpu,
    }
    for p in plan.parts:
        out[f"{p.name.replace(' ', '_')}_flops_per_image"] = p.flops_per_image
        out[f"{p.name.replace(' ', '_')}_s_per_image"] = p.seconds_per_image
    if plan.work is not None:
        out["hybrid"] = plan.work.hybrid
        out["cache_bytes_per_image"] = plan.work.cache_bytes
        for part, tokens in plan.work.tokens.items():
            out[f"{part}_tokens_per_caption"] = tokens
    return out
