"""Topology.resolve: roles from loader_to_model or per-node counts, and errors that say what does not add up."""

import pytest

from sd3.config import TopologyConfig
from sd3.config_loader import load_config
from sd3.distributed.topology import Topology, TopologyError
from sd3.errors import ConfigError


def resolve(world: int, rank: int, local: int | None = None, **kw) -> Topology:
    return Topology.resolve(TopologyConfig(**kw), world, rank, local)


def test_source_default_on_two_nodes_of_eight():
    topo = resolve(16, 0, 8)  # loaders_per_node 2, models_per_loader 3
    assert topo.loader_to_model == {0: [2, 3, 4], 1: [5, 6, 7], 8: [10, 11, 12], 9: [13, 14, 15]}
    assert topo.role == "loader" and topo.consumers == [2, 3, 4] and topo.loader_index == 0 and topo.num_loaders == 4
    assert topo.model_ranks == [2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15]
    model = resolve(16, 12, 8)
    got = (model.role, model.my_loader, model.loader_index, model.consumer_index, model.model_rank)
    assert got == ("model", 8, 2, 2, 8)
    assert model.consumers == [] and model.is_model and not model.is_main


def test_explicit_map_with_string_keys_as_in_toml():
    cfg = load_config(None, ['--topology.loader_to_model={"0" = [1, 2]}'])
    topo = Topology.resolve(cfg.topology, 3, 2, 3)
    assert topo.loader_to_model == {0: [1, 2]} and topo.my_loader == 0 and topo.consumer_index == 1
    assert Topology.resolve(cfg.topology, 3, 1, 3).is_main


def test_source_style_python_map_override():
    cfg = load_config(None, ["--topology.loader_to_model={0: [2, 3], 1: [4, 5]}"])
    topo = Topology.resolve(cfg.topology, 6, 1, 6)
    assert topo.consumers == [4, 5] and topo.loader_index == 1 and topo.num_loaders == 2


@pytest.mark.parametrize(
    "mapping, world, words",
    [
        ({"0": [1, 2]}, 4, ["rank(s) [3]", "no role"]),
        ({"0": [1, 2], "3": [2]}, 4, ["rank(s) [2]", "more than once"]),
        ({"0": [1, 5]}, 3, ["rank(s) [5]", "out of range", "WORLD_SIZE 3"]),
        ({"0": [1, 2], "3": []}, 4, ["loader rank 3 has no consumers"]),
        ({"x": [1, 2]}, 3, ["key 'x'"]),
    ],
)
def test_bad_maps_say_what_does_not_add_up(mapping, world, words):
    with pytest.raises(TopologyError) as info:
        resolve(world, 0, world, loader_to_model=mapping)
    for word in words:
        assert word in str(info.value)


def test_per_node_counts_must_match_the_node():
    with pytest.raises(TopologyError, match=r"= 8 ranks per node, but each node runs 3"):
        resolve(3, 0, 3)  # the source default needs 8 ranks per node
    with pytest.raises(TopologyError, match="not a multiple"):
        resolve(10, 0, 4, loaders_per_node=1, models_per_loader=3)
    topo = resolve(3, 1, 3, loaders_per_node=1, models_per_loader=2)
    assert topo.loader_to_model == {0: [1, 2]} and topo.my_loader == 0


@pytest.mark.parametrize("mode", ["colocated", "cached"])
def test_colocated_and_cached_have_no_loader_ranks(mode):
    topo = resolve(4, 3, 4, mode=mode)
    assert topo.role == "model" and topo.my_loader is None and topo.model_ranks == [0, 1, 2, 3]
    assert (topo.loader_index, topo.num_loaders, topo.model_rank) == (3, 4, 3)
    single = resolve(1, 0, None, mode=mode)
    assert single.is_main and single.num_model_ranks == 1


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="'topology.mode' is 'ring', not one of loader, hybrid, colocated, cached"):
        load_config("tiny-cpu", ["--topology.mode=ring"])  # choices are checked once, where the config is loaded
    with pytest.raises(TopologyError, match="max_in_flight"):
        resolve(3, 0, 3, loaders_per_node=1, models_per_loader=2, max_in_flight=0)
