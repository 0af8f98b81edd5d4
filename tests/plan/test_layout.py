"""Layouts and their predicted stall: the step model, the candidates, the recommendation, the uneven maps."""

from __future__ import annotations

import pytest

from sd3.config import TopologyConfig
from sd3.distributed.topology import Topology
from sd3.plan.layout import Layout, balanced_shares, candidate_layouts, configured_layout, predict, recommend


def test_loader_bound_layout_stalls_by_the_excess():
    # Loader 1 s/image feeding 3 consumers of batch 2: 6 s per step against the model's 2 s.
    p = predict(Layout((3,)), batch=2, loader_s_per_image=1.0, model_s_per_image=1.0)
    assert p.period_s == 6.0 and p.stall_pct == pytest.approx(100 * 4 / 6) and p.loader_idle_pct == 0.0
    assert p.images_per_s_per_gpu == pytest.approx(3 * 2 / 6 / 4)


def test_model_bound_layout_has_an_idle_loader_and_no_stall():
    p = predict(Layout((1, 1)), batch=4, loader_s_per_image=0.5, model_s_per_image=1.0)
    assert p.stall_pct == 0.0 and p.loader_idle_pct == pytest.approx(50.0)


def test_the_largest_share_sets_the_pace():
    even, uneven = Layout((2, 2, 1)), Layout((2, 2))
    a = predict(even, 1, 1.0, 1.0)
    b = predict(uneven, 1, 1.0, 1.0)
    assert a.period_s == b.period_s == 2.0
    assert a.images_per_s_per_gpu == pytest.approx(5 / 2 / 8)


def test_candidates_cover_every_loader_count_with_even_splits():
    layouts = candidate_layouts(8)
    assert [layout.shares for layout in layouts if not layout.colocated_gpus] == [(7,), (3, 3), (2, 2, 1), (1, 1, 1, 1)]
    assert all(layout.gpus == 8 for layout in layouts)
    assert balanced_shares(7, 3) == (3, 2, 2)


def test_recommendation_is_the_fastest_within_the_stall_bound():
    preds = [predict(layout, 10, 0.6, 1.0) for layout in candidate_layouts(8)]
    # 2+2+1: the 2-share loaders need 12 s per 10 s model step (stall 16.7 %) but train 5 GPUs' worth: 0.52
    # img/s/GPU against 4x1:1's 0.50 at no stall. The bound decides which one is recommended.
    assert recommend(preds, 5.0).layout.shares == (1, 1, 1, 1)
    assert recommend(preds, 20.0).layout.shares == (2, 2, 1)


def test_configured_layout_reads_the_topology():
    assert configured_layout(TopologyConfig(loaders_per_node=2, models_per_loader=3), 8).shares == (3, 3)
    uneven = TopologyConfig(loader_to_model={"0": [3, 4], "1": [5, 6], "2": [7]})
    assert configured_layout(uneven, 8).shares == (2, 2, 1)
    assert configured_layout(TopologyConfig(mode="colocated"), 8).colocated_gpus == 8


def test_topology_accepts_the_uneven_map_the_planner_recommends():
    layout = Layout((2, 2, 1))
    mapping = {str(k): v for k, v in layout.loader_to_model().items()}
    assert mapping == {"0": [3, 4], "1": [5, 6], "2": [7]}
    cfg = TopologyConfig(loader_to_model=mapping)
    roles = [Topology.resolve(cfg, 8, r, 8) for r in range(8)]
    assert [t.role for t in roles] == ["loader"] * 3 + ["model"] * 5
    assert roles[2].consumers == [7] and roles[7].my_loader == 2 and roles[7].consumer_index == 0
    assert layout.overrides() == ["--topology.loader_to_model={0:[3,4],1:[5,6],2:[7]}"]
