"""Text in and out: prompts (text, ids, chat messages), detokenization, stop strings."""
from __future__ import annotations

import json
from pathlib import Path


class Tokenizer:
    """Wraps a Hugging Face fast tokenizer the way vLLM uses it."""

    def __init__(self, path: str | Path, model_dir: str | Path | None = None):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(path))
        eos = self.hf.eos_token_id
        self.eos_token_id = eos if isinstance(eos, int) else None
        # Every end-of-sequence id: the tokenizer's and those of the model's
        # generation_config.json (an int or a list: Llama-3 instruct lists 128001 and 128009),
        # as vLLM and transformers' generate stop on each of them.
        self.eos_token_ids = frozenset({self.eos_token_id} - {None}) | generation_eos_ids(
            model_dir if model_dir is not None else path)

    def encode_prompt(self, prompt) -> tuple[str | None, list[int]]:
        """Return (prompt text or None, token ids) for text, ids or chat messages."""
        if isinstance(prompt, str):
            return prompt, list(self.hf(prompt)["input_ids"])
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            for m in prompt:
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError(f"chat message {m!r} is invalid: each message needs string "  # noqa: TRY004
                                     "'role' and 'content'")
            if not self.hf.chat_template:
                raise ValueError("chat messages given but the tokenizer has no chat template")
            text = self.hf.apply_chat_template(list(prompt), tokenize=False,
                                               add_generation_prompt=True)
            return text, list(self.hf(text, add_special_tokens=False)["input_ids"])
        if isinstance(prompt, (list, tuple)) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"prompt {prompt!r:.80} is invalid: give a non-empty string, a non-empty "
                         "list of token ids, or a list of chat messages")

    def decode(self, token_ids: list[int]) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """One token decoded alone, special tokens shown (the text of a logprob entry)."""
        return self.hf.decode([token_id], skip_special_tokens=False)


def find_stop(text: str, stops: list[str], start: int = 0) -> int:
    """Index of the earliest stop string in ``text`` at or after ``start``, or -1."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def generation_eos_ids(model_dir: str | Path) -> frozenset[int]:
    """The eos_token_id(s) of ``model_dir``/generation_config.json (empty if none)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return frozenset()
    values = value if isinstance(value, list) else [value]
    return frozenset(v for v in values if isinstance(v, int) and not isinstance(v, bool))
