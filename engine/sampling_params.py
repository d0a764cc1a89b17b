"""SamplingParams: how to pick tokens and when to stop (vLLM's names and defaults)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


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
        Per-request seed: the same seed gives the same tokens whatever the batch.
    stop : str or list of str, optional
        Stop strings; the text is cut before the first one and finish_reason is "stop".
    stop_token_ids : list of int, optional
        Extra token ids that end generation (kept in token_ids, not in text).
    ignore_eos : bool
        Keep generating past the EOS token.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
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
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", self.seed, "must be an int or None")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            bad("stop", self.stop, "must be a non-empty string or a list of non-empty strings")
        self.stop_list = stop
        ids = list(self.stop_token_ids or [])
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            bad("stop_token_ids", self.stop_token_ids, "must be a list of ints >= 0")
        self.stop_token_ids = ids
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", self.ignore_eos, "must be a bool")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

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
