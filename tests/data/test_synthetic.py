"""The shapes data: deterministic, captions state what is drawn, and the pixels agree with the labels."""

import numpy as np

from sd3.data.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SHAPE_COLOURS, SHAPES, SIZES, make_shapes, render


def test_deterministic_and_prefix_stable():
    a = list(make_shapes(20, seed=3))
    b = list(make_shapes(30, seed=3))[:20]
    assert [s.recaption for s in a] == [s.recaption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True))
    assert [s.recaption for s in a] != [s.recaption for s in make_shapes(20, seed=4)]


def test_captions_and_pixels_match_labels():
    samples = list(make_shapes(300, seed=0))
    assert {s.labels.shape for s in samples} == set(SHAPES)
    assert {s.labels.colour for s in samples} == set(SHAPE_COLOURS)
    assert {s.labels.background for s in samples} == set(BACKGROUNDS)
    assert {s.labels.position for s in samples} == set(POSITIONS)
    assert {(s.labels.width, s.labels.height) for s in samples} == set(SIZES)
    assert any(s.recaption.startswith("The image shows") for s in samples)  # exercises caption cleaning
    for s in samples:
        lab = s.labels
        assert lab.colour in SHAPE_COLOURS and lab.background in BACKGROUNDS
        assert s.image.size == (lab.width, lab.height)
        for caption in (s.recaption, s.recaption_short):
            assert lab.colour in caption and lab.shape in caption and lab.background in caption
        assert POSITIONS[lab.position][2] in s.recaption and lab.position in s.recaption_short
        arr = np.asarray(s.image)
        row, col, _ = POSITIONS[lab.position]
        cy, cx = int((row + 1) * lab.height / 4), int((col + 1) * lab.width / 4)
        assert tuple(arr[cy, cx]) == COLOURS[lab.colour]  # the shape covers its centre
        corners = [tuple(arr[y, x]) for y in (0, -1) for x in (0, -1)]
        assert corners.count(COLOURS[lab.background]) >= 3  # and leaves the background at (at least) 3 corners
        assert np.array_equal(np.asarray(render(lab)), arr)


def test_prepare_shapes_skips_finished_stages(tmp_path):
    from sd3.data.index import BucketIndex
    from sd3.data.synthetic import prepare_shapes

    seen: list[tuple[str, str]] = []
    data = prepare_shapes(tmp_path, 24, max_res=64, log=lambda stage, status: seen.append((stage, status)))
    assert [stage for stage, status in seen if status == "..."] == ["make-dataset", "create-phase", "create-indices"]
    assert BucketIndex.load(data.index, data.phase).num_rows == 24

    # An interrupted run: the index was never finished. Only that stage runs again.
    data.index.with_suffix(".complete").unlink()
    seen.clear()
    prepare_shapes(tmp_path, 24, max_res=64, log=lambda stage, status: seen.append((stage, status)))
    assert [stage for stage, status in seen if status == "..."] == ["create-indices"]
    assert all(status.startswith("done already") for stage, status in seen if stage != "create-indices")


def test_prepare_shapes_redoes_stages_made_with_other_settings(tmp_path):
    from sd3.data.index import BucketIndex
    from sd3.data.synthetic import prepare_shapes

    prepare_shapes(tmp_path, 24, max_res=64)
    seen: list[tuple[str, str]] = []
    data = prepare_shapes(tmp_path, 16, max_res=64, log=lambda stage, status: seen.append((stage, status)))
    assert [stage for stage, status in seen if status == "..."] == ["make-dataset", "create-phase", "create-indices"]
    assert BucketIndex.load(data.index, data.phase).num_rows == 16  # no row of the 24-image dataset survives
