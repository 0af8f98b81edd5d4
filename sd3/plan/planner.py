"""The plan of one configuration: each loader part's and the MMDiT's cost per image, and every node layout's stall.

Costs are FLOPs counted on the real architectures (sd3/plan/counting.py) divided by the FLOP/s each part achieves:
the GPU's bf16 peak × the part's assumed efficiency (PlanSettings), or what `--measure` found on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sd3.config import Config
from sd3.plan.counting import MMDiTFlops, mmdit_flops, part_flops
from sd3.plan.encoders import PARTS, local_folder, text_config
from sd3.plan.layout import Prediction, candidate_layouts, configured_layout, predict, recommend
from sd3.plan.settings import PlanSettings


@dataclass(frozen=True)
class PartCost:
    name: str
    flops_per_image: float
    flops_per_s: float  # achieved (assumed or measured)

    @property
    def seconds_per_image(self) -> float:
        return self.flops_per_image / self.flops_per_s


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

    @property
    def loader_s_per_image(self) -> float:
        return sum(p.seconds_per_image for p in self.parts)

    @property
    def model_s_per_image(self) -> float:
        return self.mmdit.executed / self.mmdit_flops_per_s


def count_costs(cfg: Config, height: int, width: int) -> tuple[dict[str, float], MMDiTFlops]:
    """FLOPs per image of each loader part and of the MMDiT at height×width px. CLIP reads its own window
    (max_position_embeddings: 77 for Meta-CLIP) whatever model.text_tokens is, as sd3/encoders/text.py does."""
    loader = {}
    for part in PARTS:
        folder = local_folder(part, cfg.encoders)
        tokens = cfg.model.text_tokens
        if part == "clip":
            tokens = text_config("clip", folder=folder).max_position_embeddings
        loader[part] = part_flops(part, tokens, height, width, folder=folder)
    return loader, mmdit_flops(cfg.model, height, width)


def make_plan(cfg: Config, settings: PlanSettings, height: int, width: int,
              achieved: dict[str, float] | None = None,
              counted: tuple[dict[str, float], MMDiTFlops] | None = None) -> Plan:
    """The plan at height×width px. achieved: measured FLOP/s per part and "mmdit" (None: peak × efficiencies).
    counted: FLOP counts from count_costs, when the caller has them already."""
    loader_flops, mmdit = counted or count_costs(cfg, height, width)
    source = "assumed" if achieved is None else "measured"
    if achieved is None:
        peak = settings.peak_flops
        achieved = {p: peak * settings.efficiency(p) for p in (*PARTS, "mmdit")}
    parts = [PartCost(p, loader_flops[p], achieved[p]) for p in PARTS]
    l_img = sum(p.seconds_per_image for p in parts)
    m_img = mmdit.executed / achieved["mmdit"]
    batch = cfg.data.batch_size
    layouts = [predict(layout, batch, l_img, m_img) for layout in candidate_layouts(settings.gpus_per_node)]
    configured = predict(configured_layout(cfg.topology, settings.gpus_per_node), batch, l_img, m_img)
    return Plan(height, width, batch, parts, mmdit, achieved["mmdit"], configured,
                recommend(layouts, settings.max_stall_pct), layouts, source)


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
        out[f"{p.name}_flops_per_image"] = p.flops_per_image
    return out
