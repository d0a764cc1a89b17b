"""Request outputs in vLLM's shape: RequestOutput with CompletionOutput(s) and timings."""
from __future__ import annotations

from dataclasses import dataclass, field

from lorry.engine.lora.request import LoRARequest


@dataclass
class Logprob:
    """A token's log probability, its rank in the distribution (1 = most likely) and its text
    (the token decoded alone, special tokens shown)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One generated completion: text, token ids and why it ended ("stop", "length", "abort",
    or "error" when the request failed: its adapter could not be loaded, or its logits turned
    NaN or infinite; see RequestOutput.error).

    ``logprobs`` (when SamplingParams.logprobs is set): one {token id: Logprob} per generated
    token, the chosen token first, then the requested number of most likely ones.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict[int, Logprob]] | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the chosen tokens' logprobs (None without logprobs)."""
        if self.logprobs is None:
            return None
        return sum(step[t].logprob for step, t in zip(self.logprobs, self.token_ids))


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of a request's life; None until reached."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """The output of one request (partial while unfinished)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    lora_request: LoRARequest | None = None
    finished: bool = False
    metrics: RequestMetrics | None = field(default=None)
    # finish_reason "error": why the request failed (its adapter could not be loaded, or
    # its logits turned NaN or infinite)
    error: str | None = None
    # prompt tokens whose keys/values came from the prefix cache, computed for another request
    # (earlier, or earlier in the same step) with the same leading tokens and adapter, instead
    # of being computed for this one
    num_cached_tokens: int = 0

    @property
    def usage(self) -> dict:
        """Token counts in OpenAI's shape (``prompt_tokens_details.cached_tokens``: the
        prompt tokens served from the prefix cache)."""
        done = sum(len(o.token_ids) for o in self.outputs)
        n = len(self.prompt_token_ids)
        return {"prompt_tokens": n, "completion_tokens": done, "total_tokens": n + done,
                "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens}}
