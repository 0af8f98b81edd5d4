"""Caption validity and cleaning as the source did it."""

import numpy as np
import pytest

from sd3.data.captions import caption_text, choose_long, clean_caption, remove_opening


@pytest.mark.parametrize("value", [None, "", "   \n", b"", b"\xff\xfe\xfd", 42, ["a"], 3.5])
def test_unusable_captions(value):
    assert caption_text(value) is None


def test_usable_captions():
    assert caption_text("  A  dog\non grass ") == "A dog on grass"
    assert caption_text("Un café".encode()) == "Un café"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The image shows a dog on grass.", "A dog on grass."),
        ("This picture depicts two cats.", "Two cats."),
        ("In this picture, a man rides a bike.", "A man rides a bike."),
        ("In the image we can see a red car.", "A red car."),
        ("This is an image of a bridge.", "A bridge."),
        ("The photo features: mountains.", "Mountains."),
        ("The painting shows a ship.", "The painting shows a ship."),  # style information is kept
        ("A dog shows the image.", "A dog shows the image."),
    ],
)
def test_openings_removed(text, expected):
    assert remove_opening(text) == expected


class Fixed:
    """A stand-in generator whose draws are given."""

    def __init__(self, values):
        self.values = np.array(values, dtype=float)

    def random(self, n=None):
        return self.values[:n] if n else float(self.values[0])


def test_article_and_punctuation_follow_the_draws():
    text = "The image shows an owl at night."
    assert clean_caption(text, Fixed([0.9, 0.9])) == "An owl at night."
    assert clean_caption(text, Fixed([0.1, 0.9])) == "Owl at night."
    assert clean_caption(text, Fixed([0.9, 0.1])) == "An owl at night"
    assert clean_caption(text, Fixed([0.1, 0.1])) == "Owl at night"
    assert clean_caption("Anna at night", Fixed([0.1, 0.1])) == "Anna at night"  # "An" only as a word
    assert clean_caption("A", Fixed([0.1, 0.1])) == "A"  # never cleaned to nothing


def test_half_and_half_and_replayable():
    rng = np.random.default_rng(0)
    outs = [clean_caption("A cat.", rng) for _ in range(2000)]
    for variant in ("A cat.", "Cat.", "A cat", "Cat"):
        assert 0.2 < outs.count(variant) / len(outs) < 0.3
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    assert [clean_caption("A cat.", rng_a) for _ in range(50)] == [clean_caption("A cat.", rng_b) for _ in range(50)]
    rng = np.random.default_rng(1)
    assert 0.45 < np.mean([choose_long(rng) for _ in range(4000)]) < 0.55
