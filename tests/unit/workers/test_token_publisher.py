"""Streamed text while Redis is away: one try per REDIS_RETRY_S, not one (of seconds) per
piece, and one warning for the outage, not one per piece (an outage audit saw a warning per
token and a publisher thread that fell further behind with every piece)."""
from __future__ import annotations

import logging
import time

import lorry.workers.tokens as tokens
from lorry.workers.tokens import TokenPublisher


class Flaky:
    """A Redis client whose publish fails until ``back`` is set."""

    def __init__(self):
        self.back, self.tries, self.published = False, 0, []

    def publish(self, channel, data):
        self.tries += 1
        if not self.back:
            raise ConnectionError("Connection refused")
        self.published.append((channel, data))


def _drained(pub: TokenPublisher, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pub._pending.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)


def test_pieces_are_dropped_while_redis_is_away_and_published_once_it_is_back(monkeypatch,
                                                                             caplog):
    monkeypatch.setattr(tokens, "REDIS_RETRY_S", 0.3)
    redis = Flaky()
    pub = TokenPublisher("redis://unused", "p", client=redis)
    with caplog.at_level(logging.WARNING, logger="lorry.workers.tokens"):
        for i in range(200):
            pub("job_a", "x", None)
        _drained(pub)
        assert redis.tries == 1          # one try, then the outage's pieces are dropped
        redis.back = True
        time.sleep(0.35)
        pub("job_a", "y", "stop")
        _drained(pub)
    assert redis.tries == 2 and len(redis.published) == 1
    channel, data = redis.published[0]
    assert channel == "p:stream:job_a" and '"offset": 200' in data   # offsets stay exact
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "cannot publish" in warnings[0] and "200 pieces were dropped" in warnings[1]
