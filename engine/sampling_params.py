"""SamplingParams: how to pick tokens and when to stop (vLLM's names and defaults)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence, Set
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs allows
SEED_RANGE = (-2**63, 2**64)  # torch.Generator.manual_seed's


def _many(value) -> bool:
    """A list, tuple, set, range... (what stop and stop_token_ids may be), not a string."""
    return isinstance(value, (Sequence, Set)) and not isinstance(value, (str, bytes))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


@dataclass
class SamplingParams:
    """Sampling and stopping parameters of one request.

    Parameters
    ----------
    max_tokens : int
        Most tokens to generate (>= 1).
    temperature : float
        0 means greedy; otherwise logits are divided by it.
    top_p : float
        Nucleus sampling mass in (0, 1].
    top_k : int
        Keep the k most likely tokens; -1 or 0 turns it off.
    seed : int, optional
        Per-request seed in [-2**63, 2**64): the same seed gives the same tokens whatever
        the batch.
    stop : str or list of str, optional
        Stop strings; the text is cut before the first one and finish_reason is "stop".
    stop_token_ids : list of int, optional
        Extra token ids that end generation (kept in token_ids, not in text).
    ignore_eos : bool
        Keep generating past the EOS token.
    presence_penalty : float
        In [-2, 2] (OpenAI's): subtracted once from the logit of every token already
        generated; > 0 favours new tokens.
    frequency_penalty : float
        In [-2, 2] (OpenAI's): subtracted from a token's logit once per time it was generated.
    repetition_penalty : float
        > 0 (Hugging Face's): the logit of every token of the prompt or the output is divided
        by it when positive and multiplied by it when negative; 1 is off.
    logprobs : int, optional
        Return, per generated token, its logprob and those of the ``logprobs`` most likely
        tokens (0..20; 0: the chosen token's only). Logprobs are of the model's own
        distribution: the log-softmax of the raw logits, before penalties, temperature,
        top-k and top-p (vLLM's default).
    n : int
        Completions per request; only 1 is supported.
    stream : bool
        Hand each step's new text to ``LLMEngine.on_tokens`` while the request runs.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None
    n: int = 1
    stream: bool = False
    stop_list: list[str] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        def bad(name, value, allowed):
            raise ValueError(f"SamplingParams.{name}={value!r} is invalid: {allowed}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "must be an int >= 1")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not 0.0 <= self.temperature <= 100.0:
            bad("temperature", self.temperature, "must be a number in [0, 100]")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) \
                or not 0.0 < self.top_p <= 1.0:
            bad("top_p", self.top_p, "must be a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", self.top_k, "must be an int: -1 or 0 (off) or >= 1")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(
                self.seed, int) or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            bad("seed", self.seed, "must be None or an int in [-2**63, 2**64) (what a torch "
                "generator takes)")
        stop = [self.stop] if isinstance(self.stop, str) else [] if self.stop is None \
            else self.stop
        if not _many(stop) or not all(isinstance(s, str) and s for s in stop):
            bad("stop", self.stop, "must be a non-empty string or a list of non-empty strings")
        self.stop_list = list(stop)
        ids = [] if self.stop_token_ids is None else self.stop_token_ids
        if not _many(ids) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            bad("stop_token_ids", self.stop_token_ids, "must be a list of ints >= 0")
        self.stop_token_ids = list(ids)
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", self.ignore_eos, "must be a bool")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _number(value) or not -2.0 <= value <= 2.0:
                bad(name, value, "must be a number in [-2, 2]")
        if not _number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", self.repetition_penalty, "must be a number in (0, 10]")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(
                self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", self.logprobs, f"must be None or an int in [0, {MAX_LOGPROBS}]")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n != 1:
            bad("n", self.n, "only n=1 (one completion per request) is supported")
        if not isinstance(self.stream, bool):
            bad("stream", self.stream, "must be a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def device_sampled(self) -> bool:
        """Nothing needs the logits on the host (penalties, logprobs) nor its own generator
        (a seed, unless greedy): its tokens may be picked on the device over several steps
        (``num_scheduler_steps``)."""
        return not self.penalized and self.logprobs is None and (self.greedy
                                                                 or self.seed is None)

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)

    @classmethod
    def from_dict(cls, data: dict | None) -> SamplingParams:
        """Build from a JSON-like dict; unknown keys raise ValueError naming them."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
