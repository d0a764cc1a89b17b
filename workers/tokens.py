"""Per-token extras of a job's output: its logprobs as the JSON a Result stores, and the text
of streaming jobs published to Redis as the engine produces it."""
from __future__ import annotations

import json
import logging
import queue
import threading
import time

log = logging.getLogger(__name__)
REDIS_RETRY_S = 5.0   # pieces are dropped this long after a publish failed, then tried again


def stream_channel(prefix: str, job_id: str) -> str:
    """The Redis pub/sub channel of a streaming job's text (the API subscribes to it)."""
    return f"{prefix}:stream:{job_id}"


def logprobs_json(completion, top: int | None) -> list[dict] | None:
    """A CompletionOutput's logprobs as JSON: per token {"id", "token", "logprob", "top":
    [[id, token, logprob], ...]} with the ``top`` most likely tokens, most likely first."""
    if getattr(completion, "logprobs", None) is None:
        return None
    out = []
    for token_id, step in zip(completion.token_ids, completion.logprobs):
        chosen = step[token_id]
        best = sorted((lp.rank, tid, lp) for tid, lp in step.items()
                      if lp.rank is not None and lp.rank <= (top or 0))
        out.append({"id": token_id, "token": chosen.decoded_token, "logprob": chosen.logprob,
                    "top": [[tid, lp.decoded_token, lp.logprob] for _, tid, lp in best]})
    return out


class TokenPublisher:
    """``LLMEngine.on_tokens`` for a worker: each step's new text of a streaming job goes to
    its channel as ``{"offset", "text", "finish_reason"}`` (offset: characters sent before).

    The engine thread only puts into a queue; a daemon thread publishes, so a slow or absent
    Redis never holds up a step (the pieces it cannot publish are dropped and logged; the
    job's result is still recorded in the job table).
    """

    def __init__(self, broker_url: str, prefix: str = "lorry", client=None):
        if client is None:
            import redis

            client = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        self._redis, self._prefix = client, prefix
        self._sent: dict[str, int] = {}  # only the engine thread touches it
        self._pending: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._publish_forever, name="lorry-stream",
                                        daemon=True)
        self._thread.start()

    def __call__(self, request_id: str, text: str, finish_reason: str | None) -> None:
        offset = self._sent.get(request_id, 0)
        if finish_reason is None:
            self._sent[request_id] = offset + len(text)
        else:
            self._sent.pop(request_id, None)
        # NUL as the stored result writes it (PostgreSQL text cannot hold it)
        text = text.replace("\x00", "\ufffd")
        self._pending.put((request_id, {"offset": offset, "text": text,
                                        "finish_reason": finish_reason}))

    def _publish_forever(self) -> None:
        down_until, dropped = 0.0, 0
        while True:
            request_id, message = self._pending.get()
            if time.monotonic() < down_until:   # Redis was away a moment ago: no try per
                dropped += 1                    # piece (each held the thread for seconds)
                continue
            try:
                self._redis.publish(stream_channel(self._prefix, request_id),
                                    json.dumps(message))
            except Exception as e:  # noqa: BLE001 - Redis away: the API reads the stored result
                if not down_until:
                    log.warning("cannot publish streamed text (%s: %s); pieces are dropped "
                                "while Redis is away, tried again every %.0f s (the API reads "
                                "the stored results)", type(e).__name__, e, REDIS_RETRY_S)
                down_until = time.monotonic() + REDIS_RETRY_S
                dropped += 1
            else:
                if down_until:
                    log.warning("publishing streamed text again; %d pieces were dropped while "
                                "Redis was away", dropped)
                down_until, dropped = 0.0, 0
