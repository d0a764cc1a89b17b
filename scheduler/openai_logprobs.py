"""Per-token logprobs as OpenAI returns them (chat and text completions), from the JSON a
Result stores: torch-free, shared by the API's answers and the batch output files."""
from __future__ import annotations

from typing import Any


def _bytes(token: str | None) -> list[int]:
    return list((token or "").encode("utf-8"))


def chat_logprobs(entries: list[dict] | None) -> dict[str, Any] | None:
    """``{"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": None}``."""
    if entries is None:
        return None
    content = [{"token": e["token"], "logprob": e["logprob"], "bytes": _bytes(e["token"]),
                "top_logprobs": [{"token": tok, "logprob": lp, "bytes": _bytes(tok)}
                                 for _, tok, lp in e.get("top", [])]}
               for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[dict] | None) -> dict[str, Any] | None:
    """``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``;
    each token's top_logprobs holds the sampled token too (``logprobs=0``: only it)."""
    if entries is None:
        return None
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"] or "")
    tops = []
    for e in entries:  # tokens with the same text (e.g. partial UTF-8) keep the likeliest
        top: dict[str, float] = {}
        for _, tok, lp in e.get("top", []):
            top.setdefault(tok, lp)
        # OpenAI: "always the logprob of the sampled token", so up to logprobs + 1 entries
        top.setdefault(e["token"], e["logprob"])
        tops.append(top)
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries], "top_logprobs": tops,
            "text_offset": offsets}
