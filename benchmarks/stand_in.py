"""What a stand-in engine's step() hands the Drainer: the fields of lorry.engine's outputs
that the drain reads (request id, text, token ids, finish reason, usage)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Completion:
    text: str
    token_ids: list
    finish_reason: str


@dataclass
class Output:
    request_id: str
    outputs: list
    usage: dict
    metrics: object = None
    error: str | None = None


def finished(request_id: str, tokens: int, prompt_tokens: int, reason: str = "length") -> Output:
    """A request that generated ``tokens`` tokens (ids 0..tokens-1, one "x" each)."""
    return Output(request_id, [Completion("x" * tokens, list(range(tokens)), reason)],
                  {"prompt_tokens": prompt_tokens, "completion_tokens": tokens})
