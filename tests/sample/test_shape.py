"""The shape classifier on the data's own renders: ~100 % on clean images, robust to the blur a sampler leaves."""

import dataclasses

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sd3.data.buckets import exact_size
from sd3.data.synthetic import SHAPES, make_shapes, render
from sd3.sample.shape import classify_shape


def heldout(n: int, max_res: int, seed: int = 3):
    """Shapes rendered at the size create-phase gives them at max_res (as bench learn generates them)."""
    for s in make_shapes(n, seed):
        h, w = exact_size(s.labels.height, s.labels.width, max_res)
        labels = dataclasses.replace(s.labels, height=h, width=w)
        yield render(labels), labels


@pytest.mark.parametrize("max_res", [64, 128])
def test_clean_renders_are_classified(max_res):
    samples = list(heldout(120, max_res))
    assert {labels.shape for _, labels in samples} == set(SHAPES)
    hits = [classify_shape(image).shape == labels.shape for image, labels in samples]
    assert np.mean(hits) >= 0.98, np.mean(hits)


def test_blurred_and_downscaled_images_are_still_classified():
    """Generated 64 px images are soft-edged; a full-size render shrunk to 64 px and blurred stands in for them."""
    hits = []
    for s in make_shapes(100, seed=4):
        h, w = exact_size(s.labels.height, s.labels.width, 64)
        image = s.image.resize((w, h), Image.LANCZOS).filter(ImageFilter.GaussianBlur(1.0))
        hits.append(classify_shape(image).shape == s.labels.shape)
    assert np.mean(hits) >= 0.9, np.mean(hits)


def test_the_answer_follows_the_image_not_a_default():
    """Each shape is recognised as itself, and an empty image as no shape at all."""
    for image, labels in heldout(60, 64, seed=5):
        guess = classify_shape(image)
        assert guess.scores[labels.shape] == max(guess.scores.values())
    blank = Image.new("RGB", (64, 64), (245, 245, 245))
    assert classify_shape(blank).shape is None
