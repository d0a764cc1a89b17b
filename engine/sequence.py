"""Sequence: one request's state while it waits, runs and finishes."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from lorry.engine.lora.request import LoRARequest
from lorry.engine.outputs import Logprob, RequestMetrics
from lorry.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_request: LoRARequest | None
    metrics: RequestMetrics
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)  # KV cache blocks (engine.kv_cache)
    table_epoch: int = 0           # numbers each allocation of block_table (graph inputs)
    adapter_key: bytes = b""       # part of its prefix-cache digests (engine.kv_cache)
    block_digests: list[bytes] = field(default_factory=list)  # of its full blocks, in order
    prefill_len: int = 0           # tokens the next prefill puts in the cache (0: the prompt)
    text: str = ""
    finish_reason: str | None = None
    num_computed_tokens: int = 0   # prefill tokens whose keys/values are in the KV cache
    # prompt tokens its first prefill found in the prefix cache (-1: no prefill step ran yet);
    # a recompute after preemption finds its own blocks there, which are not counted
    num_cached_tokens: int = -1
    bypassed: int = 0              # admissions of later sequences while this one waited for a slot
    error: str | None = None       # why the request failed (e.g. its adapter could not be loaded)
    logprobs: list[dict[int, Logprob]] | None = None  # per output token, if params.logprobs
    streamed: int = 0              # characters of text already handed to on_tokens

    def __post_init__(self):
        self.prefill_len = self.prefill_len or len(self.prompt_token_ids)

    @property
    def lora_id(self) -> int | None:
        return self.lora_request.lora_int_id if self.lora_request else None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def prefill_tokens(self) -> list[int]:
        """What a prefill computes: the prompt, or after a preemption (recompute) the prompt
        and the tokens generated so far, whose last logits choose the next token."""
        n = self.prefill_len
        if n <= len(self.prompt_token_ids):
            return self.prompt_token_ids
        return self.prompt_token_ids + self.output_token_ids[:n - len(self.prompt_token_ids)]

    @property
    def prefilling(self) -> bool:
        """Running, with prefill tokens still to put into the KV cache (chunked prefill)."""
        return self.num_computed_tokens < self.prefill_len

    @property
    def last_token(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]
