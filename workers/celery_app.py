"""The Celery application: Redis broker, task events on (Flower), beat schedule of maintain.

An edge: it reads the settings from the environment once, and the tasks use that object."""
from __future__ import annotations

from celery import Celery

from lorry.settings import celery_names, get_settings

settings = get_settings()
app = Celery("lorry", broker=settings.broker_url, backend=settings.result_backend,
             include=["lorry.workers.tasks"])
app.conf.update(
    # Flower builds its worker and task views from these events.
    worker_send_task_events=True,
    task_send_sent_event=True,
    # One GPU worker = one engine: take one drain at a time and nothing in advance.
    worker_prefetch_multiplier=1,
    # this deployment's queue and exchanges (its LORRY_REDIS_PREFIX): the workers consume
    # the queue, beat and the API's nudges send to it, Flower watches and controls only them
    **celery_names(settings.redis_prefix),
    task_acks_late=False,
    task_ignore_result=settings.result_backend is None,
    broker_connection_retry_on_startup=True,
    # A worker outlives any Redis outage (Celery's default gives up after 100 tries and the
    # worker exits): meanwhile it drains the job table on its own (tasks._watch_broker).
    broker_connection_max_retries=None,
    worker_hijack_root_logger=False,
    beat_schedule={
        # expires: runs missed while the worker was busy are dropped, not piled up.
        "maintain": {"task": "lorry.maintain", "schedule": settings.maintain_interval,
                     "options": {"expires": settings.maintain_interval}},
    },
)
