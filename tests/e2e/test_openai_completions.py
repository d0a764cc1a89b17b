"""The official openai SDK against the real API + Celery worker: synchronous and streamed chat
completions, text completions with logprobs, and Lorry's errors read through the SDK."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from lorry.client import Client
from tests.e2e.conftest import create_tenant

MESSAGES = [{"role": "user", "content": "Tell me about lorries"}]


@pytest.fixture(scope="module")
def sdk(stack):
    key = create_tenant(stack, "openai-sdk")
    Client(stack["api"], key).add_adapter("alpha", str(stack["adapters"]["alpha"]))
    client = openai.OpenAI(base_url=f"{stack['api']}/v1", api_key=key, max_retries=0,
                           timeout=120)
    client.lorry_key = key
    return client


def test_chat_stream_concatenates_to_the_plain_answer(sdk):
    kw = {"model": "alpha", "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    plain = sdk.chat.completions.create(**kw)
    assert plain.object == "chat.completion" and plain.model == "alpha"
    answer = plain.choices[0].message.content
    assert answer and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens >= 1
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(sdk.chat.completions.create(**kw, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == answer
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_stream_is_server_sent_events_ending_with_done(stack, sdk):
    with httpx.stream("POST", f"{stack['api']}/v1/completions", timeout=120,
                      headers={"Authorization": f"Bearer {sdk.lorry_key}"},
                      json={"model": "base", "prompt": "Once upon", "max_tokens": 12,
                            "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    # the text arrives as the worker produces it, not as one piece at the end
    assert sum(bool(c["choices"][0]["text"]) for c in chunks) >= 2
    plain = sdk.completions.create(model="base", prompt="Once upon", max_tokens=12,
                                   temperature=0)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain.choices[0].text


def test_completion_and_chat_logprobs(sdk):
    out = sdk.completions.create(model="alpha", prompt="The lorry", max_tokens=6,
                                 temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    n = out.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
    assert all(v <= 0 for v in lp.token_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(max(top.values()) == pytest.approx(v) for top, v in
               zip(lp.top_logprobs, lp.token_logprobs))
    chat = sdk.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=6,
                                       temperature=0.8, seed=7, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert item.logprob <= tops[0] + 1e-6
    again = sdk.chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=6,
                                        temperature=0.8, seed=7)
    assert again.choices[0].message.content == chat.choices[0].message.content


def test_penalties_change_the_answer(sdk):
    kw = {"model": "base", "prompt": "aaaa", "max_tokens": 16, "temperature": 0}
    plain = sdk.completions.create(**kw).choices[0].text
    penalized = sdk.completions.create(**kw, frequency_penalty=2.0, presence_penalty=2.0,
                                       extra_body={"repetition_penalty": 3.0}).choices[0].text
    assert penalized != plain


def test_errors_read_through_the_sdk(sdk):
    with pytest.raises(openai.NotFoundError) as e:
        sdk.chat.completions.create(model="no-such-adapter", messages=MESSAGES)
    assert "'no-such-adapter' does not exist" in e.value.message
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model="alpha", messages=MESSAGES, n=2)
    assert "n=2 is not supported" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model="alpha", messages=MESSAGES,
                                    response_format={"type": "json_object"})
    assert "not supported" in e.value.message


def test_chat_without_max_tokens_answers_up_to_the_context(sdk):
    """No max_tokens: the answer may fill the context (LORRY_MAX_MODEL_LEN=128 here), as
    OpenAI's and vLLM's chat answer; it stopped at the engine's default of 16 tokens."""
    out = sdk.chat.completions.create(model="alpha", messages=MESSAGES, temperature=0,
                                      extra_body={"ignore_eos": True}, seed=-1)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == 128 and out.usage.completion_tokens > 16
    assert sdk.models.retrieve("base").owned_by == "lorry"
