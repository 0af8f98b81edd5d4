"""Token positions per caption on a caption-length mix: untrimmed pads a step to its longest, trimmed per micro-batch"""

from __future__ import annotations

import numpy as np
import pytest

from sd3.plan.captions import CaptionMix, tokens_per_caption


def test_untrimmed_pays_the_steps_longest_and_trimmed_each_captions_own():
    # Two-caption steps of 10- or 30-token captions, equally likely: the longest of two is 30 three times in four.
    mix = CaptionMix(np.array([10, 30]), np.array([10, 30]), long_prob=0.5)
    assert tokens_per_caption(mix, rows=2, max_tokens=77, micro_batch=0) == pytest.approx(25.0, abs=1.0)
    assert tokens_per_caption(mix, rows=2, max_tokens=77, micro_batch=1) == pytest.approx(20.0, abs=1.0)
    # One micro-batch as large as the step is no trimming at all.
    assert tokens_per_caption(mix, 2, 77, micro_batch=2) == tokens_per_caption(mix, 2, 77, micro_batch=0)


def test_the_long_caption_probability_picks_the_column_per_step():
    mix = CaptionMix(np.array([60]), np.array([15]), long_prob=0.25)
    assert tokens_per_caption(mix, 8, 77, 0) == pytest.approx(0.25 * 60 + 0.75 * 15, abs=2.0)
    assert tokens_per_caption(CaptionMix(mix.long, mix.short, 1.0), 8, 77, 0) == 60.0


def test_captions_are_truncated_at_the_encoders_window():
    mix = CaptionMix(np.array([200]), np.array([200]), long_prob=0.5)
    assert tokens_per_caption(mix, 4, 77, 0) == tokens_per_caption(mix, 4, 77, 1) == 77.0


def test_normal_mix_is_reproducible_and_centred_on_its_means():
    a, b = CaptionMix.normal(60, 15, 0.25, 0.5), CaptionMix.normal(60, 15, 0.25, 0.5)
    assert np.array_equal(a.long, b.long) and a.short.min() >= 1
    assert a.long.mean() == pytest.approx(60, rel=0.02) and a.short.mean() == pytest.approx(15, rel=0.03)
