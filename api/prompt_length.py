"""Refuse prompts that cannot fit the engine's max_model_len, counted with the base model's
tokenizer.json (``tokenizers`` only: no torch, no transformers in the API)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from lorry.api.errors import ApiError


@lru_cache(maxsize=4)
def _tokenizer(model: str):
    """The base model's fast tokenizer, or None when it is not a local directory with one."""
    path = Path(model) / "tokenizer.json"
    if not path.is_file():
        return None  # a Hub id or a missing model: the worker's engine decides
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception:  # noqa: BLE001 - an unreadable file must not block submissions
        return None


def prompt_tokens(model: str, prompt: str | None, messages: list[str] | None) -> int | None:
    """Tokens of a text prompt (as the engine encodes it), or a lower bound for chat messages.

    For messages the chat template adds tokens, and BPE may merge a token across each edge
    of a content, so the bound counts each content's tokens minus two: never above the real
    count, so no request that fits is refused. None when no tokenizer is available.
    """
    tok = _tokenizer(model)
    if tok is None:
        return None
    if prompt is not None:
        return len(tok.encode(prompt).ids)  # special tokens added, as engine.tokenizer does
    return sum(max(0, len(tok.encode(c, add_special_tokens=False).ids) - 2)
               for c in messages or [])


def too_long_message(settings, prompt: str | None, messages: list[str] | None,
                     max_tokens: int | None = None) -> tuple[str, str] | None:
    """(why, the field to name) when the prompt, with room for ``max_tokens`` (when the
    request names it; else one token), cannot fit ``settings.max_model_len``; else None."""
    limit = settings.max_model_len
    if limit is None:
        return None
    count = prompt_tokens(settings.model, prompt, messages)
    # the engine needs one free position to generate: it refuses len(ids) >= max_model_len,
    # and it ends a row at max_model_len (as vLLM's server, a request asking for more is
    # refused rather than cut short)
    if count is None or count + (max_tokens or 1) <= limit:
        return None
    return _problem(prompt is not None, count, limit, max_tokens)


def too_long_messages(settings, items: list[tuple[str | None, list[str] | None]],
                      max_tokens: list[int | None] | None = None
                      ) -> list[tuple[str, str] | None]:
    """``too_long_message`` of many (prompt, contents) at once, with each one's max_tokens
    (None: not named): one batched encode (the tokenizer's own threads) instead of one call
    per prompt."""
    limit = settings.max_model_len
    tok = None if limit is None else _tokenizer(settings.model)
    if tok is None or not items:
        return [None] * len(items)
    named = max_tokens or [None] * len(items)
    wants = [m or 1 for m in named]
    # An ASCII text of n characters encodes to at most n + (tokens the encoding adds) + 1
    # (a prefix marker): every token covers at least one character (byte-level BPE: one
    # byte). Requests under that bound fit without being tokenized.
    margin = _added_tokens(tok) + 1
    sure = [p is not None and p.isascii() and len(p) + margin <= limit - want or
            p is None and all(c.isascii() for c in cs or []) and
            sum(max(0, len(c) + margin - 2) for c in cs or []) <= limit - want
            for (p, cs), want in zip(items, wants)]
    prompts = [(i, p) for i, (p, _) in enumerate(items) if p is not None and not sure[i]]
    contents = [(i, c) for i, (p, cs) in enumerate(items) if p is None and not sure[i]
                for c in cs or []]
    counts = [0] * len(items)
    if prompts:
        for (i, _), n in zip(prompts, _token_counts(tok, [p for _, p in prompts], True)):
            counts[i] = n
    if contents:
        for (i, _), n in zip(contents, _token_counts(tok, [c for _, c in contents], False)):
            counts[i] += max(0, n - 2)
    return [None if count + want <= limit else _problem(prompt is not None, count, limit, m)
            for (prompt, _), count, want, m in zip(items, counts, wants, named)]


ENCODE_CHARS = 1 << 20   # text per encode_batch call: its Encodings hold ~100 bytes a token


def _token_counts(tok, texts: list[str], special: bool):
    """len(ids) of each text, encoded in batches of about ENCODE_CHARS characters: one call
    over a chunk of 2,000 lines of long prompts built every Encoding at once (an API went
    from 0.6 to 1.8 GB with four batch creates of 106 MB files: a bulk audit)."""
    start = 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (end == start or size + len(texts[end]) <= ENCODE_CHARS):
            size += len(texts[end])
            end += 1
        for enc in tok.encode_batch(texts[start:end], add_special_tokens=special):
            yield len(enc.ids)
        start = end


@lru_cache(maxsize=4)
def _added_tokens_of(tok_id: int, tok) -> int:
    return max(len(tok.encode("").ids), len(tok.encode("a").ids) - 1)


def _added_tokens(tok) -> int:
    """Tokens the encoding adds to any text (BOS/EOS and the like)."""
    return _added_tokens_of(id(tok), tok)


def _problem(is_prompt: bool, count: int, limit: int, max_tokens: int | None = None
             ) -> tuple[str, str]:
    """(why, the field a context_length_exceeded error names): max_tokens when the prompt
    alone fits, else the prompt or the messages."""
    what = "prompt is" if is_prompt else "messages' contents are at least"
    if max_tokens and count + 1 <= limit:   # the prompt fits: max_tokens asks too much
        return (f"the {what} {count} tokens and max_tokens is {max_tokens}: {count} + "
                f"{max_tokens} is more than max_model_len {limit}; ask for at most "
                f"{limit - count} tokens, or shorten the prompt", "max_tokens")
    room = max_tokens or 1
    return (f"the {what} {count} tokens; max_model_len is {limit}, which must leave room for "
            f"{room} generated token{'s' if room > 1 else ''}: shorten the prompt to at most "
            f"{max(0, limit - room)} tokens", "prompt" if is_prompt else "messages")


def check_prompt_length(settings, prompt: str | None, messages: list[str] | None,
                        max_tokens: int | None = None, tokens_param: str = "max_tokens") -> None:
    """422 naming the token count and the limit when the prompt, with room for
    ``max_tokens`` (when the request names it, as ``tokens_param``), cannot fit."""
    problem = too_long_message(settings, prompt, messages, max_tokens)
    if problem is not None:
        reason, field = problem
        raise ApiError(422, reason, code="context_length_exceeded",
                       param=tokens_param if field == "max_tokens" else field)
