"""Captions as the source used them: validity, the long/short choice, and cleaning (source README, data loading).

The recaptioned datasets open most long captions the same way ("The image shows …", "In this picture, …");
a model trained on them learns the opening instead of the picture, so it is removed. Leading articles and a
trailing full stop are dropped half of the time so the model sees both styles of prompt. All randomness comes
from a numpy Generator given by the caller (derived from the sampler's per-step seed), so a step replays.
"""

from __future__ import annotations

import re

import numpy as np

# Only neutral nouns: "The painting shows" carries style information and is kept.
_NOUN = r"(?:image|picture|photo|photograph|scene)"
OPENINGS = (
    re.compile(
        rf"^(?:the|this|that)\s+{_NOUN}\s+(?:shows|depicts|features|displays|presents|showcases|captures|"
        r"portrays|illustrates|contains|is\s+of)\s*:?\s*",
        re.IGNORECASE,
    ),
    re.compile(
        rf"^in\s+(?:the|this)\s+{_NOUN}\s*,?\s*(?:we\s+(?:can\s+)?see\s+|there\s+(?:is|are)\s+)?",
        re.IGNORECASE,
    ),
    re.compile(rf"^(?:this|it)\s+is\s+(?:an?\s+)?{_NOUN}\s+(?:of|showing|depicting)\s+", re.IGNORECASE),
)
ARTICLE = re.compile(r"^an?\s+", re.IGNORECASE)
TRAILING_PUNCTUATION = ".!?,;:"


def caption_text(value: object) -> str | None:
    """A stored caption -> its text, or None when it is unusable (None, empty, not text, not valid UTF-8)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())  # also collapses newlines and tabs
    return text or None


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def remove_opening(text: str) -> str:
    """Strip one stock opening ("The image shows", "In this picture,", …) and re-capitalise."""
    for pattern in OPENINGS:
        stripped = pattern.sub("", text, count=1)
        if stripped != text:
            return _capitalise(stripped.lstrip(" ,:;-"))
    return text


def clean_caption(
    text: str, rng: np.random.Generator, drop_article_prob: float = 0.5, strip_punctuation_prob: float = 0.5
) -> str | None:
    """Opening removed; leading "A "/"An " dropped with drop_article_prob; a trailing punctuation mark
    stripped with strip_punctuation_prob. Exactly two draws from `rng` per caption, whatever the text, so
    the stream of draws does not depend on the data. None if nothing is left."""
    drop_article, strip_punctuation = rng.random(2)
    text = remove_opening(text)
    if drop_article < drop_article_prob:
        without = ARTICLE.sub("", text, count=1)
        if without:
            text = _capitalise(without)
    if strip_punctuation < strip_punctuation_prob and text[-1:] in TRAILING_PUNCTUATION:
        text = text[:-1].rstrip()
    return text or None


def choose_long(rng: np.random.Generator, long_caption_prob: float = 0.5) -> bool:
    """Per batch: the long caption (`recaption`) or the short one (`recaption_short`)."""
    return bool(rng.random() < long_caption_prob)
