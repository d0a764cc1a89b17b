"""The drain loop: the engine steps while claims, result writes and heartbeats run beside it.

The engine thread (the caller of ``run``) only moves claimed jobs into free engine rows,
steps the engine and hands finished outputs to the writer; nothing on it waits for the
database. The same loop runs inside the Celery ``drain`` task and in-process for
``lorry run``/``demo``.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from lorry.workers.pipeline import Claimed, Claimer, WriteOp, Writer
from lorry.workers.stats import WorkerStats, cache_counts

log = logging.getLogger(__name__)


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


def _holds_prompts(engine) -> bool:
    """Whether ``engine`` holds new prompts for larger prompt steps (its resolved
    ``prefill_min_tokens``; an engine without ``info()``, a stand-in, does not)."""
    info = getattr(engine, "info", None)
    return bool(info and info().get("prefill_min_tokens"))


class Drainer:
    """Drains the job table through one engine.

    Parameters
    ----------
    queue : lorry.scheduler.JobQueue
    engine : lorry.engine.LLMEngine
    worker_id : str
    max_num_seqs : int
        Sequences kept in the engine at once.
    claim_ahead : int, optional
        Jobs claimed beyond the engine's free rows, ready for the next free row (default
        ``max_num_seqs // 8``: enough to refill the rows a step frees, few enough that a
        newly due tenant's jobs are claimed soon after it submits); their leases are
        heartbeated and they are released on shutdown.
    engine_backlog : int, optional
        Jobs put in the engine beyond its rows, waiting there (default: ``claim_ahead`` where
        the engine holds new prompts for fewer, larger prompt steps, ``info()``'s
        ``prefill_min_tokens`` > 0, i.e. CUDA; else 0): the engine holds prompts only while
        more wait than its free rows take, so without a backlog a worker would meet none.
    max_pending_results : int, optional
        Finished jobs that may wait for the writer (default ``8 * max_num_seqs``), besides
        the batch it is writing; when that many wait, the engine waits too.
    lease_seconds, heartbeat_seconds : float
    publish : callable, optional
        Called with the WorkerStats at every heartbeat (Redis for ``/metrics``).
    on_result : callable, optional
        Called with (job, status) after each job is written (progress bars), on the writer's
        thread; status is "succeeded", "failed", "cancelled", "released" or "stale" (the
        lease was lost, the result not recorded).
    upkeep : callable, optional
        Called every ``upkeep_seconds`` on a thread of its own while a drain runs (the
        Celery worker: ``JobQueue.upkeep`` when due, since beat's maintain waits for a worker
        that is not draining).
    final_upkeep : callable, optional
        Called once when a drain that ended jobs ends, after its results are written (the
        Celery worker: ``JobQueue.upkeep`` whether due or not): the batch whose last jobs it
        ran is finalized now, not at beat's next maintain, or never where no beat runs.
    """

    def __init__(self, queue, engine, worker_id: str, *, max_num_seqs: int,
                 lease_seconds: float = 60, heartbeat_seconds: float = 10,
                 stats: WorkerStats | None = None, publish: Callable | None = None,
                 on_result: Callable | None = None, idle_claim_pause: float = 0.5,
                 claim_ahead: int | None = None, max_pending_results: int | None = None,
                 shutdown_flush_seconds: float = 30.0, upkeep: Callable | None = None,
                 upkeep_seconds: float = 15.0, check_adapter: Callable | None = None,
                 cancel_poll_seconds: float = 1.0, final_upkeep: Callable | None = None,
                 engine_backlog: int | None = None):
        self.queue, self.engine, self.worker_id = queue, engine, worker_id
        self.max_num_seqs, self.lease_seconds = max_num_seqs, lease_seconds
        self.heartbeat_seconds, self.idle_claim_pause = heartbeat_seconds, idle_claim_pause
        self.cancel_poll_seconds = cancel_poll_seconds
        self.claim_ahead = max(1, max_num_seqs // 8) if claim_ahead is None else claim_ahead
        self.max_pending_results = max_pending_results or 8 * max_num_seqs
        if engine_backlog is None:
            engine_backlog = self.claim_ahead if _holds_prompts(engine) else 0
        self.engine_backlog = engine_backlog
        self.shutdown_flush_seconds = shutdown_flush_seconds
        self.upkeep, self.upkeep_seconds = upkeep, upkeep_seconds
        self.final_upkeep = final_upkeep
        # raises ValueError for a claimed job's AdapterInfo the registration rules now refuse
        self.check_adapter = check_adapter
        self.stats, self.publish, self.on_result = stats or WorkerStats(), publish, on_result
        self.held: dict[str, Claimed] = {}  # in the engine; only the engine thread changes it
        self.names: dict[int, str] = {}  # lora_int_id -> adapter name (engine speaks ids)
        self.summary = DrainSummary()
        self._hot_warm: tuple[list[int], list[int]] = ([], [])
        self._cancels: set[str] = set()  # from the heartbeat thread to the engine thread
        self._lock = threading.Lock()
        self._claimer: Claimer | None = None
        self._writer: Writer | None = None

    # -- state reported to the scheduler ------------------------------------------------------
    def hot_warm(self) -> tuple[list[int], list[int]]:
        """The adapters in the engine's GPU slots and CPU cache, as AdapterInfo ids (the
        engine's lora_int_id is the adapter's id, see _lora_for): the scheduler matches
        affinity by id, since two tenants may name their own adapters alike."""
        loras = self.engine.list_loras()
        hot = [i for i in loras.get("gpu", []) if i in self.names]
        gpu = set(hot)
        warm = [i for i in loras.get("cpu", []) if i in self.names and i not in gpu]
        return hot, warm

    def heartbeat(self) -> None:
        """Extend the leases of every job this worker holds (in the engine, buffered, or
        waiting to be written); jobs to stop go to the engine thread (cancel requests) or are
        dropped from the buffer."""
        jobs = [c.job for c in list(self.held.values())]
        if self._claimer is not None:
            jobs += [c.job for c in self._claimer.buffered()]
        if self._writer is not None:
            jobs += self._writer.pending_jobs()
        hot, warm = self._hot_warm if self._claimer is not None else self.hot_warm()
        sent = {j.id: j.lease_token for j in jobs}
        stop = self.queue.heartbeat(self.worker_id, list(sent.items()),
                                    hot, warm, self.max_num_seqs,
                                    lease_seconds=self.lease_seconds)
        # a lease lost while this beat was on its way may be one this worker has claimed
        # back since (a database outage longer than the lease): its new lease stands
        now = {c.job.id: c.job.lease_token for c in list(self.held.values())}
        if self._claimer is not None:
            now.update((c.job.id, c.job.lease_token) for c in self._claimer.buffered())
        self._stop({i for i in stop or () if now.get(i, sent.get(i)) == sent.get(i)})
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
        self._hot_warm = self.hot_warm()
        self._writer = Writer(self.queue, self._written, self.max_pending_results)
        self._claimer = Claimer(self._claim,
                                self.max_num_seqs + self.engine_backlog + self.claim_ahead,
                                lambda: len(self.held), min_claim=max(1, self.max_num_seqs // 8),
                                idle_pause=self.idle_claim_pause)
        beats = threading.Event()
        beater = threading.Thread(target=self._beat, args=(beats,), name="lorry-heartbeat",
                                  daemon=True)
        keeper = None
        if self.upkeep is not None:
            keeper = threading.Thread(target=self._keep, args=(beats,), name="lorry-upkeep",
                                      daemon=True)
            keeper.start()
        self._writer.start()
        self._claimer.start()
        beater.start()
        try:
            self._loop(summary, start, max_seconds, should_stop, stop_when_empty)
        except BaseException as e:
            # Whatever broke (engine error, KeyboardInterrupt), give the jobs back now rather
            # than leaving them to the lease reaper; then let it propagate. An engine error
            # counts an attempt of the jobs in the engine, as a killed worker's lease does: a
            # job that breaks every step it is in fails after max_attempts instead of taking
            # its micro-batch down again and again.
            self._wind_down(beats, beater, keeper,
                            engine_error=e if isinstance(e, Exception) else None)
            raise
        self._wind_down(beats, beater, keeper)
        summary.seconds = time.monotonic() - start
        summary.tokens = self.stats.tokens_generated - tokens_at_start
        if summary.seconds > 0 and summary.tokens:   # an empty drain leaves the last figure
            self.stats.tokens_per_second = summary.tokens / summary.seconds
        try:
            self.heartbeat()
        except Exception as e:  # the database is away: the next drain's heartbeat says it
            log.warning("final heartbeat failed: %s", e)
        if self.final_upkeep is not None and (summary.succeeded or summary.failed
                                              or summary.cancelled):   # a batch may be done
            try:
                self.final_upkeep()
            except Exception as e:  # noqa: BLE001  the next drain's, or beat's, does it
                log.warning("upkeep at the drain's end failed (%s: %s)", type(e).__name__, e)
        return summary

    def _loop(self, summary, start, max_seconds, should_stop, stop_when_empty) -> None:
        engine, claimer = self.engine, self._claimer
        while True:
            if should_stop():  # warm shutdown: what is held is released by _wind_down
                summary.reason = "shutdown"
                return
            # Past the time limit: claim nothing more, finish what is held, then return.
            out_of_time = max_seconds is not None and time.monotonic() - start > max_seconds
            if out_of_time:
                claimer.pause()
                self._release_unstarted()   # the backlog: finish what runs, start nothing
            if self._cancels:
                self._stop_cancelled()
            room = self.max_num_seqs + self.engine_backlog - len(self.held)
            if not out_of_time and room > 0:
                taken = claimer.take(room)
                try:
                    for claimed in taken:
                        self._add(claimed)
                finally:
                    claimer.landed(len(taken))
            if not self.held:
                if out_of_time:
                    summary.reason = "time limit"
                    return
                if claimer.wait_for_work(0.25) == "empty" and stop_when_empty:
                    summary.reason = "queue empty"
                    return
                continue
            for out in engine.step():
                self._finish(out.request_id, out)
            self._hot_warm = self.hot_warm()

    def _wind_down(self, beats: threading.Event, beater: threading.Thread,
                   keeper: threading.Thread | None = None,
                   engine_error: Exception | None = None) -> None:
        """Give back what is held and buffered, write what is finished, stop the threads.
        With ``engine_error`` the jobs in the engine are retried (an attempt counted, their
        error says which type of error; its text may name other tenants' adapters)."""
        if engine_error is None and self.held:
            # a cancel asked since the last poll: end those jobs cancelled with the tokens
            # they have (given back, they would end cancelled without them)
            try:
                asked = self.queue.cancels_requested(list(self.held))
            except Exception as e:  # noqa: BLE001  the database is away: release decides
                log.warning("could not read cancels at shutdown: %s", e)
                asked = set()
            with self._lock:
                self._cancels |= asked
            self._stop_cancelled()
        # jobs still waiting in the engine (its backlog) never ran: given back, no attempt
        # spent, whatever broke
        self._release_unstarted()
        for job_id in list(self.held):
            self.engine.abort_request(job_id)
            job = self.held.pop(job_id).job
            if engine_error is None:
                self._writer.put(WriteOp("release", job))
            else:
                self._writer.put(WriteOp("fail", job, retryable=True, message=(
                    f"the worker's engine failed while running this job's micro-batch "
                    f"({type(engine_error).__name__}); retried up to max_attempts")))
        for claimed in self._claimer.stop():
            self._writer.put(WriteOp("release", claimed.job))
        if not self._writer.flush(self.shutdown_flush_seconds):
            log.warning("the database did not take the last results in %.0f s; their jobs "
                        "run again after their leases", self.shutdown_flush_seconds)
        beats.set()
        beater.join()
        if keeper is not None:
            keeper.join()
        self._writer.stop()
        self._claimer = self._writer = None

    def _release_unstarted(self) -> None:
        """Give back the held jobs the engine has queued but never run (``is_waiting``; an
        engine without it has none such): the backlog of ``engine_backlog``."""
        waiting = getattr(self.engine, "is_waiting", None)
        if waiting is None or not self.engine_backlog:
            return
        for job_id in [j for j in self.held if waiting(j)]:
            self.engine.abort_request(job_id)
            self._writer.put(WriteOp("release", self.held.pop(job_id).job))

    def _stop(self, stop: set[str]) -> None:
        """Jobs to stop: buffered ones end cancelled now, those in the engine go to the engine
        thread."""
        if not stop:
            return
        claimer, writer = self._claimer, self._writer
        if claimer is not None and writer is not None:
            for gone in claimer.drop(stop):  # cancelled before it started
                writer.put(WriteOp("fail", gone.job, message="cancelled before it ran",
                                   cancelled=True))
        with self._lock:
            self._cancels |= stop & set(self.held)

    def poll_cancels(self) -> None:
        """Between heartbeats: the jobs held (in the engine or buffered) whose cancel was
        asked stop now, not at the next heartbeat (a read of their ids, no lease written)."""
        ids = list(self.held)
        if self._claimer is not None:
            ids += [c.job.id for c in self._claimer.buffered()]
        if ids:
            self._stop(self.queue.cancels_requested(ids))

    def _beat(self, stop: threading.Event) -> None:
        beat_every = max(self.heartbeat_seconds, 0.02)
        poll_every = min(max(self.cancel_poll_seconds, 0.02), beat_every)
        next_beat = time.monotonic() + beat_every
        while not stop.wait(max(0.0, min(next_beat, time.monotonic() + poll_every)
                                - time.monotonic())):
            try:
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + beat_every
                    self.heartbeat()
                else:
                    self.poll_cancels()
            except Exception as e:  # the database is away: leases run on, results wait
                log.warning("heartbeat failed (%s: %s)", type(e).__name__, e)

    def _keep(self, stop: threading.Event) -> None:
        while not stop.wait(max(self.upkeep_seconds, 0.02)):
            try:
                self.upkeep()
            except Exception as e:  # the database is away: the next turn, or beat, does it
                log.warning("upkeep failed (%s: %s)", type(e).__name__, e)

    def _claim(self, n: int) -> list:
        hot, warm = self._hot_warm
        t0 = time.perf_counter()
        batches = self.queue.claim(self.worker_id, hot, warm, n,
                                   lease_seconds=self.lease_seconds)
        self.stats.claim_latency.observe(time.perf_counter() - t0)
        return batches

    def _lora_for(self, adapter):
        """The LoRARequest of a claimed job's adapter (None: base). The engine loads a new
        adapter from disk in the background while the running batch keeps decoding; one it
        refuses comes back as outputs with finish_reason "error" (see _finish)."""
        if adapter is None:
            return None
        from lorry.engine import LoRARequest
        from lorry.scheduler.types import adapter_failure

        roots = None
        if self.check_adapter is not None:
            try:
                roots = self.check_adapter(adapter)
            except ValueError as e:  # e.g. outside its tenant's root: never handed to the engine
                raise ValueError(adapter_failure(adapter.name, str(e))) from None
        self.names[adapter.id] = adapter.name
        # roots: the tenant's own, checked again by the engine whenever it reads the files
        return LoRARequest(adapter.name, adapter.id, adapter.source, revision=adapter.revision,
                           roots=roots)

    def _add(self, claimed: Claimed) -> None:
        from lorry.engine import SamplingParams

        job = claimed.job
        mine = self.held.get(job.id)
        if mine is not None:
            # our own running job, requeued while our heartbeats could not reach the
            # database (its lease ran out) and claimed back by us: it runs on, under the new
            # lease (the engine would refuse its id as in use)
            self.held[job.id] = replace(claimed, claimed_at=mine.claimed_at)
            return
        try:
            params = SamplingParams.from_dict(job.sampling)
            prompt = job.messages if job.messages is not None else job.prompt
            self.engine.add_request(job.id, prompt, params,
                                    lora_request=self._lora_for(claimed.adapter))
        except ValueError as e:  # bad sampling, prompt too long, refused adapter: not retryable
            self._writer.put(WriteOp("fail", job, message=str(e)))
            return
        except Exception as e:  # noqa: BLE001  e.g. a chat template that refuses the messages:
            # this job only (it took the drain down, and its co-running jobs' attempts); retried
            # up to max_attempts, in case it was the engine's passing trouble
            self._writer.put(WriteOp("fail", job, retryable=True, message=(
                f"the job's input could not be prepared ({type(e).__name__}: {e})")))
            return
        self.held[job.id] = claimed

    def _stop_cancelled(self) -> None:
        with self._lock:
            cancels, self._cancels = self._cancels, set()
        for job_id in cancels:
            if job_id in self.held:
                self._finish(job_id, self.engine.abort_request(job_id), cancelled=True)

    def _finish(self, job_id: str, out, cancelled: bool = False) -> None:
        from lorry.scheduler import Result
        from lorry.scheduler.types import adapter_failure
        from lorry.workers.tokens import logprobs_json

        held = self.held.pop(job_id, None)
        if held is None or out is None:
            return
        comp = out.outputs[0]
        if comp.finish_reason == "error":  # its adapter could not be loaded, or its logits
            # turned NaN: not retryable (the engine's error names the adapter: kept as it is)
            message = out.error or adapter_failure(held.job.adapter, "the engine gave no reason")
            self._writer.put(WriteOp("fail", held.job, message=message))
            return
        usage, m = out.usage, out.metrics
        # prompt tokens served from the prefix cache (a stand-in engine's usage has none)
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        timings = {"run_s": time.monotonic() - held.claimed_at}
        if m is not None and m.first_token_time and m.arrival_time:
            timings["first_token_s"] = m.first_token_time - m.arrival_time
        # PostgreSQL text cannot hold NUL; token_ids keep the exact output.
        result = Result(text=comp.text.replace("\x00", "\ufffd"),
                        token_ids=list(comp.token_ids),
                        finish_reason=comp.finish_reason, prompt_tokens=usage["prompt_tokens"],
                        completion_tokens=usage["completion_tokens"], cached_tokens=cached,
                        timings=timings,
                        logprobs=logprobs_json(comp, held.job.sampling.get("logprobs")))
        self._writer.put(WriteOp("complete", held.job, result=result, cancelled=cancelled))

    def _written(self, op: WriteOp, written) -> None:
        """Count a write (the writer's thread calls this after each op; ``written``: False
        for a stale lease, a retryable fail's the job's status)."""
        summary, stats = self.summary, self.stats
        if op.kind == "release" and written == "cancelled":  # its cancel came before it ran on
            status = "cancelled"
            stats.jobs[status] += 1
            summary.cancelled += 1
        elif op.kind == "release" or (op.retryable and written in (False, "queued")):
            status = "released" if written else "stale"   # retryable: queued again
            summary.released += bool(written)
        elif op.kind == "fail":  # cancelled=True: a cancel request stopped it before it ran
            # (or a retryable fail of a job whose attempts are spent or that was cancelled)
            status = ("cancelled" if op.cancelled or written == "cancelled" else "failed") \
                if written else "stale"
            if written:
                stats.jobs[status] += 1
                setattr(summary, status, getattr(summary, status) + 1)
        else:
            status = ("cancelled" if op.cancelled else "succeeded") if written else "stale"
            stats.tokens_generated += op.result.completion_tokens
            stats.job_run.observe(op.result.timings["run_s"])
            if written:
                stats.jobs[status] += 1
                setattr(summary, status, getattr(summary, status) + 1)
        requeued = (op.kind == "release" and status != "cancelled") or (
            op.retryable and status in ("released", "stale"))
        if self.on_result is not None and not requeued:   # the job's end
            self.on_result(op.job, status)
