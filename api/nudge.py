"""Nudge the GPU workers' ``drain`` task through Celery, de-duplicated by a Redis key with TTL."""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)
DRAIN_TASK = "lorry.drain"


class DrainNudger:
    """Send a ``lorry.drain`` message unless one is pending (the key; a drain clears it).

    The job table is the source of truth, so a nudge that is lost (Redis down, TTL window)
    only delays work until beat's next nudge; it never loses a job.
    """

    def __init__(self, broker_url: str, prefix: str = "lorry", ttl: float = 30.0):
        import redis
        from celery import Celery

        from lorry.settings import celery_names

        self._redis = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)
        self._celery = Celery("lorry-api", broker=broker_url)
        self._celery.conf.update(broker_connection_retry_on_startup=False,
                                 broker_connection_max_retries=1, task_send_sent_event=True,
                                 **celery_names(prefix))
        self._key = f"{prefix}:nudge:drain"
        self._ttl_ms = max(1, int(ttl * 1000))

    def __call__(self) -> bool:
        """True when a message was sent (False: de-duplicated or broker unreachable)."""
        try:
            if not self._redis.set(self._key, b"1", nx=True, px=self._ttl_ms):
                return False
            self._celery.send_task(DRAIN_TASK, retry=False)
            return True
        except Exception as e:  # the nudge is best effort; beat re-nudges
            log.warning("could not nudge the workers: %s", e)
            return False
