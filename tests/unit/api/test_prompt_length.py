"""Prompt lengths counted for a whole batch chunk at once give each request's own answer,
however the texts are split into encode calls (ENCODE_CHARS bounds one call's memory)."""
from __future__ import annotations

import random

import pytest

from lorry.api import prompt_length


@pytest.mark.parametrize("chars", [1, 37, 1 << 20])
def test_batched_counts_match_one_request_at_a_time(service, monkeypatch, chars):
    settings = service[2].model_copy(update={"max_model_len": 64})
    monkeypatch.setattr(prompt_length, "ENCODE_CHARS", chars)
    rng = random.Random(chars)
    words = ["héllo", "wörld", "lorry", "🚚", "tok", "x" * 30, "é" * 9]
    items, limits = [], []
    for i in range(60):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 40)))
        if i % 3:
            items.append((text, None))
        else:
            items.append((None, [text, text[: len(text) // 2]]))
        limits.append(rng.choice([None, 1, 8, 30]))
    got = prompt_length.too_long_messages(settings, items, limits)
    want = [prompt_length.too_long_message(settings, p, m, t)
            for (p, m), t in zip(items, limits)]
    assert got == want
    assert any(g is not None for g in got) and any(g is None for g in got)
