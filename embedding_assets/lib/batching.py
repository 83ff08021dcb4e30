"""How passages are split into embedding requests, and the token estimate that splitting uses."""

from __future__ import annotations

import math
from collections.abc import Sequence

CHARS_PER_TOKEN = 3  # a deliberate over-estimate for Cyrillic and Latin text alike


def approximate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def plan_batches(texts: Sequence[str], max_inputs: int, max_tokens: int) -> list[tuple[int, int]]:
    """Contiguous (start, end) slices holding at most max_inputs texts and about max_tokens tokens."""
    batches: list[tuple[int, int]] = []
    start, tokens = 0, 0
    for i, text in enumerate(texts):
        cost = approximate_tokens(text)
        if i > start and (i - start >= max_inputs or tokens + cost > max_tokens):
            batches.append((start, i))
            start, tokens = i, 0
        tokens += cost
    if start < len(texts):
        batches.append((start, len(texts)))
    return batches
