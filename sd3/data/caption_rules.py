"""The source's post-processing of generated captions (SEED_SPEC §i): strip stock openings, and fail captions that
are repetitive or say nothing. Pure string functions, so each rule is tested on planted outputs."""

from __future__ import annotations

import re

# Stock openings a captioning model starts with, and what replaces them (source: "The image shows " -> "",
# "In this artwork, " -> "Artwork of ", ...). Matched case-insensitively at the start, longest first.
OPENINGS: dict[str, str] = {
    "the image shows ": "", "the image depicts ": "", "the image features ": "", "the image displays ": "",
    "the image captures ": "", "the image is ": "", "this image shows ": "", "this image depicts ": "",
    "this image features ": "", "this image is ": "", "in this image, ": "", "in the image, ": "",
    "the picture shows ": "", "this picture shows ": "", "the photo shows ": "", "this photo shows ": "",
    "the photograph shows ": "", "this is an image of ": "", "this is a picture of ": "", "this is a photo of ": "",
    "in this artwork, ": "Artwork of ", "this artwork depicts ": "Artwork of ", "the artwork depicts ": "Artwork of ",
    "this artwork shows ": "Artwork of ", "the artwork shows ": "Artwork of ",
}
# Phrases of a caption that talks about what is *not* there or about the prompt itself; more than
# MAX_FILLER of them in total fails the caption (source: 5).
FILLER_PHRASES = (" no text", " other objects", " additional objects", " no objects ", "alt-text")
MAX_FILLER = 5
MIN_UNIQUE_WORDS = 3  # fewer unique words than this: a failed caption

# Why a row is dropped, as counted in the summary.
EMPTY, REPETITIVE, TOO_FEW_WORDS, SHORT_FAILED = "empty", "repetitive", "too_few_words", "short_failed"


def strip_openings(caption: str) -> str:
    """Drop (or replace) one stock opening, repeatedly while another follows, and capitalise the first letter."""
    text = caption.strip()
    changed = True
    while changed:
        changed = False
        for opening in sorted(OPENINGS, key=len, reverse=True):
            if text.lower().startswith(opening):
                text = OPENINGS[opening] + text[len(opening):].lstrip()
                changed = True
                break
    return text[:1].upper() + text[1:]


def failure(caption: str | None) -> str | None:
    """The reason a caption fails (EMPTY, REPETITIVE, TOO_FEW_WORDS), or None when it is usable."""
    if caption is None or not caption.strip():
        return EMPTY
    lowered = caption.lower()
    if sum(lowered.count(phrase) for phrase in FILLER_PHRASES) > MAX_FILLER:
        return REPETITIVE
    if len(set(re.findall(r"[a-z0-9']+", lowered))) < MIN_UNIQUE_WORDS:
        return TOO_FEW_WORDS
    return None


def clean(caption: str | None) -> tuple[str | None, str | None]:
    """(the cleaned caption, None) or (None, why it failed). The failure rules see the caption as generated."""
    reason = failure(caption)
    if reason is not None:
        return None, reason
    return strip_openings(caption), None
