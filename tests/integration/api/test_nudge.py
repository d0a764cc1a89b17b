"""Drain nudges on the real Redis: one pending message at a time, again once a drain took it."""
from __future__ import annotations

import json
import os
import uuid
from urllib.parse import urlsplit

import pytest
import redis

from lorry.api.nudge import DrainNudger

REDIS = os.environ.get("LORRY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_url():
    url = urlsplit(REDIS)._replace(path="/12").geturl()  # a DB of its own for these tests
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def test_nudges_are_deduplicated_until_a_drain_takes_them(redis_url):
    prefix = f"t{uuid.uuid4().hex[:6]}"
    nudge = DrainNudger(redis_url, prefix, ttl=30)
    client = redis.Redis.from_url(redis_url)
    assert nudge() is True
    assert nudge() is False and nudge() is False
    # kombu's Redis transport: one list per queue, this deployment's own (its prefix's)
    messages = client.lrange(f"{prefix}:tasks", 0, -1)
    assert len(messages) == 1
    assert json.loads(messages[0])["headers"]["task"] == "lorry.drain"
    client.delete(f"{prefix}:nudge:drain")  # what the drain task does when it starts
    assert nudge() is True and client.llen(f"{prefix}:tasks") == 2
    assert client.llen("celery") == 0
    client.close()


def test_two_deployments_on_one_redis_database_nudge_their_own_workers(redis_url):
    """Both sent to Celery's one default queue, ``celery``: a deployment's workers took the
    other's drains and drained their own empty table (a bulk audit)."""
    import subprocess
    import sys

    client = redis.Redis.from_url(redis_url)
    for prefix in ("blue", "green"):
        assert DrainNudger(redis_url, prefix, ttl=30)() is True
        # the queue a worker of that deployment consumes (its Celery app's default queue)
        queue = subprocess.run(
            [sys.executable, "-c", "from lorry.workers.celery_app import app; c = app.conf; "
             "print(c.task_default_queue, c.event_exchange, c.control_exchange)"],
            capture_output=True, text=True, check=True,
            env={**os.environ, "LORRY_REDIS_PREFIX": prefix, "LORRY_BROKER_URL": redis_url},
        ).stdout.split()
        # and its events and remote control (what Flower shows and sends) are its own
        assert queue == [f"{prefix}:tasks", f"{prefix}.celeryev", f"{prefix}.control"]
        assert client.llen(queue[0]) == 1
    client.close()


def test_unreachable_broker_is_not_an_error():
    nudge = DrainNudger("redis://127.0.0.1:1/0", "x", ttl=1)
    assert nudge() is False
