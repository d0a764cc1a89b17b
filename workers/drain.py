"""The drain loop: claim micro-batches, feed the engine continuously, write results, keep leases.

The same loop runs inside the Celery ``drain`` task and in-process for ``lorry run``/``demo``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from lorry.workers.stats import WorkerStats, cache_counts

log = logging.getLogger(__name__)


@dataclass
class Held:
    """A claimed job that is inside the engine."""

    job: object  # scheduler.ClaimedJob
    claimed_at: float
    cancel_requested: bool = False


@dataclass
class DrainSummary:
    reason: str = ""
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    released: int = 0
    tokens: int = 0
    seconds: float = 0.0
    results: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"reason": self.reason, "succeeded": self.succeeded, "failed": self.failed,
                "cancelled": self.cancelled, "released": self.released, "tokens": self.tokens,
                "seconds": round(self.seconds, 3)}


class Drainer:
    """Drains the job table through one engine.

    Parameters
    ----------
    queue : scheduler.JobQueue
    engine : engine.LLMEngine
    worker_id : str
    max_num_seqs : int
        Sequences kept in the engine at once (the claim asks for the free ones).
    lease_seconds, heartbeat_seconds : float
    publish : callable, optional
        Called with the WorkerStats at every heartbeat (Redis for ``/metrics``).
    on_result : callable, optional
        Called with (job, status) after each job is written (progress bars).
    """

    def __init__(self, queue, engine, worker_id: str, *, max_num_seqs: int,
                 lease_seconds: float = 60, heartbeat_seconds: float = 10,
                 stats: WorkerStats | None = None, publish: Callable | None = None,
                 on_result: Callable | None = None, idle_claim_pause: float = 0.5):
        self.queue, self.engine, self.worker_id = queue, engine, worker_id
        self.max_num_seqs, self.lease_seconds = max_num_seqs, lease_seconds
        self.heartbeat_seconds, self.idle_claim_pause = heartbeat_seconds, idle_claim_pause
        self.stats, self.publish, self.on_result = stats or WorkerStats(), publish, on_result
        self.held: dict[str, Held] = {}
        self.names: dict[int, str] = {}  # lora_int_id -> adapter name (engine speaks ids)
        self.summary = DrainSummary()

    # -- state reported to the scheduler ------------------------------------------------------
    def hot_warm(self) -> tuple[list[str], list[str]]:
        loras = self.engine.list_loras()
        hot = [self.names[i] for i in loras.get("gpu", []) if i in self.names]
        warm = [self.names[i] for i in loras.get("cpu", []) if i in self.names and
                self.names[i] not in hot]
        return hot, warm

    def heartbeat(self) -> None:
        hot, warm = self.hot_warm()
        leases = [(jid, h.job.lease_token) for jid, h in self.held.items()]
        cancel = self.queue.heartbeat(self.worker_id, leases, hot, warm, self.max_num_seqs,
                                      lease_seconds=self.lease_seconds)
        for job_id in cancel or ():
            if job_id in self.held and not self.held[job_id].cancel_requested:
                self.held[job_id].cancel_requested = True
                out = self.engine.abort_request(job_id)
                self._finish(job_id, out, cancelled=True)
        self.stats.cache = cache_counts(self.engine)
        if self.publish is not None:
            self.publish(self.stats)

    # -- the loop -----------------------------------------------------------------------------
    def run(self, *, max_seconds: float | None = None, should_stop: Callable[[], bool] = bool,
            stop_when_empty: bool = True) -> DrainSummary:
        """Drain until the queue is empty, ``max_seconds`` pass, or ``should_stop()``."""
        self.summary = summary = DrainSummary()
        start = time.monotonic()
        self.stats.drains += 1
        tokens_at_start = self.stats.tokens_generated
        try:
            self._loop(summary, start, max_seconds, should_stop, stop_when_empty)
        except BaseException:
            # Whatever broke (database down, engine error, KeyboardInterrupt), give the jobs
            # back now rather than leaving them to the lease reaper; then let it propagate.
            self._wind_down()
            raise
        self._wind_down()
        summary.seconds = time.monotonic() - start
        summary.tokens = self.stats.tokens_generated - tokens_at_start
        if summary.seconds > 0:
            self.stats.tokens_per_second = summary.tokens / summary.seconds
        self.heartbeat()
        return summary

    def _loop(self, summary, start, max_seconds, should_stop, stop_when_empty) -> None:
        next_beat, next_claim = start, start
        while True:
            now = time.monotonic()
            if should_stop():  # warm shutdown: what is held is released by run()
                summary.reason = "shutdown"
                return
            # Past the time limit: claim nothing more, finish what is held, then return.
            out_of_time = max_seconds is not None and now - start > max_seconds
            if out_of_time and not self.held:
                summary.reason = "time limit"
                return
            free = self.max_num_seqs - len(self.held)
            claimed = None
            if free > 0 and now >= next_claim and not out_of_time:
                claimed = self._claim(free)
                if not claimed:  # nothing queued: do not ask again at every step
                    next_claim = now + self.idle_claim_pause
            if not self.held:
                if claimed == 0 and stop_when_empty:
                    summary.reason = "queue empty"
                    return
                time.sleep(max(0.0, next_claim - time.monotonic()))
                continue
            for out in self.engine.step():
                self._finish(out.request_id, out)
            if time.monotonic() >= next_beat:
                self.heartbeat()
                next_beat = time.monotonic() + self.heartbeat_seconds

    def _wind_down(self) -> None:
        """Give back what the engine still holds: released jobs return to the queue at once."""
        for job_id in list(self.held):
            held = self.held.pop(job_id)
            self.engine.abort_request(job_id)
            try:
                if self.queue.release(job_id, held.job.lease_token):
                    self.summary.released += 1
            except Exception as e:  # the database is away: the lease reaper returns it later
                log.warning("could not release %s: %s", job_id, e)

    def _claim(self, free: int) -> int:
        hot, warm = self.hot_warm()
        t0 = time.perf_counter()
        batches = self.queue.claim(self.worker_id, hot, warm, free,
                                   lease_seconds=self.lease_seconds)
        self.stats.claim_latency.observe(time.perf_counter() - t0)
        count = 0
        for mb in batches:
            lora = self._lora_for(mb)
            for job in mb.jobs:
                count += 1
                self._add(job, lora)
        return count

    def _lora_for(self, mb):
        """The LoRARequest of a micro-batch (None: base). The engine loads a new adapter from
        disk in the background while the running batch keeps decoding; an adapter it refuses
        comes back as outputs with finish_reason "error", which fail their jobs (_finish)."""
        if mb.adapter is None:
            return None
        from lorry.engine import LoRARequest

        a = mb.adapter
        self.names[a.id] = a.name
        return LoRARequest(a.name, a.id, a.source, revision=a.revision)

    def _add(self, job, lora) -> None:
        from lorry.engine import SamplingParams

        try:
            params = SamplingParams.from_dict(job.sampling)
            prompt = job.messages if job.messages is not None else job.prompt
            self.engine.add_request(job.id, prompt, params, lora_request=lora)
        except ValueError as e:  # bad sampling, prompt too long, refused adapter: not retryable
            self._fail(job, str(e))
            return
        self.held[job.id] = Held(job, time.monotonic())

    def _fail(self, job, message: str) -> None:
        self.queue.fail(job.id, job.lease_token, message, retryable=False)
        self.stats.jobs["failed"] += 1
        self.summary.failed += 1
        if self.on_result is not None:
            self.on_result(job, "failed")

    def _finish(self, job_id: str, out, cancelled: bool = False) -> None:
        from lorry.scheduler import Result

        held = self.held.pop(job_id, None)
        if held is None or out is None:
            return
        comp = out.outputs[0]
        if comp.finish_reason == "error":  # its adapter could not be loaded: not retryable
            self._fail(held.job, f"adapter {held.job.adapter!r} cannot be loaded: {out.error}")
            return
        usage = out.usage
        m = out.metrics
        timings = {"run_s": time.monotonic() - held.claimed_at}
        if m is not None and m.first_token_time and m.arrival_time:
            timings["first_token_s"] = m.first_token_time - m.arrival_time
        # PostgreSQL text cannot hold NUL; token_ids keep the exact output.
        result = Result(text=comp.text.replace("\x00", "\ufffd"),
                        token_ids=list(comp.token_ids),
                        finish_reason=comp.finish_reason, prompt_tokens=usage["prompt_tokens"],
                        completion_tokens=usage["completion_tokens"], timings=timings)
        try:
            written = self.queue.complete(job_id, held.job.lease_token, result,
                                          cancelled=cancelled)
        except Exception as e:  # a result the database refuses fails this job, not the drain
            log.exception("cannot store the result of %s", job_id)
            self._fail(held.job, f"the result could not be stored: {type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:300]}")
            return
        self.stats.tokens_generated += usage["completion_tokens"]
        self.stats.job_run.observe(timings["run_s"])
        status = "cancelled" if cancelled else "succeeded"
        if written:
            self.stats.jobs[status] += 1
            setattr(self.summary, status, getattr(self.summary, status) + 1)
        if self.on_result is not None:
            self.on_result(held.job, status if written else "stale")

