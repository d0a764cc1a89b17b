"""Batch lines read by the ingest give exactly pydantic's answer (the same values for a valid
line, the same code and message for a refused one), over many valid and invalid variants."""
from __future__ import annotations

import json
import random

from lorry.api.batch_fast import accept
from lorry.api.batch_input import (
    BatchLine,
    ParsedLine,
    RequestBody,
    read_line,
    read_line_with_pydantic,
)
from lorry.api.schemas import ChatMessage, OpenAIOptions, TextPart
from lorry.scheduler.types import LineError

CHAT = {"custom_id": "c-1", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "adapter-1", "max_tokens": 64, "temperature": 0.7,
                 "messages": [{"role": "system", "content": "Answer briefly."},
                              {"role": "user", "content": "héllo, tenant"}]}}
TEXT = {"custom_id": "t-1", "method": "POST", "url": "/v1/completions",
        "body": {"model": "base", "prompt": "once upon", "top_p": 0.9, "top_k": 40,
                 "seed": 7, "stop": ["\n"], "logprobs": 2, "ignore_eos": False,
                 "stream": False, "n": 1, "user": "u-1", "stop_token_ids": [2],
                 "presence_penalty": 1, "frequency_penalty": -0.5,
                 "repetition_penalty": 1.1, "max_completion_tokens": 12}}

VALUES = [None, True, False, 0, 1, -1, 2, 3, 0.0, -0.0, 0.5, 1.0, 2.0, 2.5, 10.0, 10.5, 16,
          20, 21, 128, 129, 4096, 4097, 2**63 - 1, 2**63, -2**63 - 1, 10**30, 1e300, "", "x",
          "0.7", "x" * 16, "x" * 17, "a\x00b", "POST", "post", "/v1/completions",
          "/v1/chat/completions", "adapter-1", "-bad", "a" * 65, "base", [], ["a"], [""],
          ["a"] * 17, [1, 2], [True], [2**63], [1.5], [-1], [2**31 - 1], [2**31], ["a", 1],
          {}, {"type": "text"},
          {"type": "json_object"}, [{"role": "user", "content": "x"}],
          [{"role": "bad", "content": "x"}], [{"role": "user"}],
          [{"role": "user", "content": "x", "name": "n"}], [{"role": "user", "content": 1}],
          [{"role": ["user"], "content": "x"}], [{"role": "user", "content": "\x00"}],
          [{"role": "assistant", "content": ""}] * 257, "p" * 200_001]
KEYS = ["custom_id", "method", "url", "body", "colour"]
BODY_KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens",
             "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
             "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs",
             "top_logprobs", "n", "user", "response_format", "stream", "colour"]


reference = read_line_with_pydantic  # pydantic's answer, in the shape the ingest keeps


def same(got, want) -> bool:
    """Equal, floats and ints told apart (the stored sampling JSON shows the difference)."""
    if isinstance(got, LineError) or isinstance(want, LineError):
        return got == want
    return got == want and json.dumps(got) == json.dumps(want)


def variants(seed: int = 0, count: int = 4000):
    rng = random.Random(seed)
    for _ in range(count):
        line = json.loads(json.dumps(rng.choice([CHAT, TEXT])))
        for _ in range(rng.choice([1, 1, 2, 3])):
            if rng.random() < 0.75:
                target, key = line.get("body"), rng.choice(BODY_KEYS)
                if not isinstance(target, dict):
                    continue
            else:
                target, key = line, rng.choice(KEYS)
            if rng.random() < 0.15:
                target.pop(key, None)
            else:
                target[key] = rng.choice(VALUES)
        yield line


def test_common_lines_are_read_as_pydantic_reads_them():
    for line in (CHAT, TEXT):
        raw = json.dumps(line).encode()
        assert accept(json.loads(raw)) is not None  # the cheaper check takes them
        got = read_line(1, raw)
        assert isinstance(got, ParsedLine) and same(got, reference(1, raw))
    got = read_line(1, json.dumps(TEXT).encode())
    assert got.sampling == {"top_p": 0.9, "top_k": 40, "seed": 7, "stop": ["\n"],
                            "stop_token_ids": [2], "ignore_eos": False,
                            "presence_penalty": 1.0, "frequency_penalty": -0.5,
                            "repetition_penalty": 1.1, "max_tokens": 12, "logprobs": 2}
    assert isinstance(got.sampling["presence_penalty"], float)


def test_every_variant_gets_pydantics_answer():
    accepted = refused = 0
    memo: dict = {}  # shared by the lines of one file
    for number, line in enumerate(variants(), start=1):
        raw = json.dumps(line).encode()
        got, want = read_line(number, raw, memo), reference(number, raw)
        assert same(got, want), (line, got, want)
        assert same(read_line(number, raw), want)
        accepted += isinstance(want, ParsedLine)
        refused += isinstance(want, LineError)
    assert accepted > 300 and refused > 300  # both sides of the check were exercised


def test_lines_of_one_file_with_equal_looking_options_keep_their_own_sampling():
    memo: dict = {}
    for logprobs, top in [(True, None), (1, None), (True, 3), (0, None), (False, None)]:
        body = {**TEXT["body"], "logprobs": logprobs, "top_logprobs": top}
        raw = json.dumps({**TEXT, "body": body}).encode()
        got = read_line(1, raw, memo)
        assert same(got, reference(1, raw)) and isinstance(got, ParsedLine), logprobs


def test_the_line_models_hold_only_the_rules_the_cheaper_check_knows():
    """A validator added to a batch line's models must be mirrored in batch_fast.accept.
    (_ints, whole-number floats as ints: accept leaves every float given for an int field to
    pydantic.)"""
    rules = {m.__name__: (list(m.__pydantic_decorators__.field_validators),
                          list(m.__pydantic_decorators__.model_validators))
             for m in (BatchLine, RequestBody, OpenAIOptions, ChatMessage, TextPart)}
    assert rules == {"BatchLine": ([], ["_input_matches_url"]),
                     "RequestBody": (["_ints"], ["_supported"]),
                     "OpenAIOptions": (["_ints"], []), "ChatMessage": ([], []),
                     "TextPart": ([], [])}


def test_raw_lines_that_are_not_plain_json_get_pydantics_answer():
    chat = json.dumps(CHAT)
    for raw in [b"{not json", b"[]", b"null", b'"x"', b"\xff\xfe", chat.encode() + b" x",
                chat.replace('"c-1"', '"c\\u0000"').encode(),
                chat.replace('"c-1"', '"c\\ud800"').encode(),
                chat.replace('"c-1"', '"c\\ud83d\\ude00"').encode(),
                chat.replace("0.7", "NaN").encode(), chat.replace("0.7", "1e400").encode(),
                chat.replace("64", "64.0").encode(), chat.replace("64", "true").encode(),
                chat.replace('"max_tokens"', '"max_tokens": 1, "max_tokens"').encode(),
                b"[" * 40 + b"]" * 40, b"  " + chat.encode() + b"\r"]:
        assert same(read_line(3, raw), reference(3, raw)), raw


def test_each_refusal_of_a_line_names_its_own_value():
    """Two bad fields: the first's value was shown after the last message, as if the
    temperature were the custom_id's string."""
    line = {**CHAT, "custom_id": "c" * 600, "body": {**CHAT["body"], "temperature": 9}}
    err = read_line(1, json.dumps(line).encode())
    assert isinstance(err, LineError) and err.param == "custom_id"
    cid, temp = err.message.split("; ")
    assert '(got "ccc' in cid and "custom_id" in cid
    assert temp.startswith("body.temperature") and temp.endswith("(got 9)")
