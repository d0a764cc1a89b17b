"""A finished job as OpenAI's objects: chat.completion, text_completion, their stream chunks,
and logprobs in each endpoint's shape (lorry.scheduler.openai_logprobs)."""
from __future__ import annotations

import json
import time
from typing import Any

from lorry.scheduler.batch_files import usage_of
from lorry.scheduler.openai_logprobs import chat_logprobs, completion_logprobs


def object_id(job_id: str, chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + job_id.removeprefix("job_")


def completion_object(info, model: str, chat: bool) -> dict[str, Any]:
    """The chat.completion / text_completion answer of a succeeded job."""
    res = info.result
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": res.text},
                  "logprobs": chat_logprobs(res.logprobs), "finish_reason": res.finish_reason}
    else:
        choice = {"index": 0, "text": res.text, "logprobs": completion_logprobs(res.logprobs),
                  "finish_reason": res.finish_reason}
    return {"id": object_id(info.id, chat),
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage_of(res), "system_fingerprint": None}


class ChunkWriter:
    """Server-sent events of one streamed answer: ``data: {chunk}\\n\\n`` ... ``data: [DONE]``."""

    def __init__(self, job_id: str, model: str, chat: bool):
        self.id, self.model, self.chat = object_id(job_id, chat), model, chat
        self.created = int(time.time())

    def _event(self, body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def chunk(self, text: str | None, finish_reason: str | None = None, *,
              role: bool = False, logprobs: list[dict] | None = None) -> str:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": chat_logprobs(logprobs),
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": completion_logprobs(logprobs),
                      "finish_reason": finish_reason}
        return self._event({"id": self.id, "created": self.created, "model": self.model,
                            "object": "chat.completion.chunk" if self.chat else "text_completion",
                            "choices": [choice], "system_fingerprint": None})

    def usage(self, usage: dict[str, Any]) -> str:
        return self._event({"id": self.id, "created": self.created, "model": self.model,
                            "object": "chat.completion.chunk" if self.chat else "text_completion",
                            "choices": [], "usage": usage})

    @staticmethod
    def error(body: dict) -> str:
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
