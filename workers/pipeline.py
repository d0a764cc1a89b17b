"""The drain's database side, on threads of its own so that the engine never waits for SQL:
a claimer that keeps claimed jobs ready ahead of the engine's free rows, and a writer that
records finished results in batches (each row still fenced by its lease token)."""
from __future__ import annotations

import logging
import queue as queue_lib
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from lorry.scheduler import errors

log = logging.getLogger(__name__)
# The queue's typed errors for "write it again later": the database cannot be reached, or it
# aborted the transaction on a conflict (nothing of it was applied).
UNAVAILABLE = (errors.Unavailable, errors.Retryable, OSError)
BACKOFF = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


def backoff(attempt: int) -> float:
    return BACKOFF[min(attempt, len(BACKOFF) - 1)]


@dataclass
class Claimed:
    """A claimed job waiting for an engine row, with its micro-batch's adapter (None: base)."""

    job: object  # scheduler.ClaimedJob
    adapter: object  # scheduler.AdapterInfo | None
    claimed_at: float = field(default_factory=time.monotonic)


class Claimer:
    """Claims in the background while the engine runs: ``outstanding()`` (rows in the engine
    plus buffered jobs) is kept near ``capacity``; the engine takes jobs with ``take``.

    ``claim(n)`` returns micro-batches (the queue's claim with this worker's hot/warm
    adapters). A failed claim (database away) is retried with backoff; nothing is lost, since
    a claim that did not answer leased nothing that outlives its lease.
    """

    def __init__(self, claim: Callable[[int], list], capacity: int, engine_rows: Callable[[], int],
                 min_claim: int = 1, idle_pause: float = 0.5):
        self._claim, self.capacity, self._engine_rows = claim, capacity, engine_rows
        self.min_claim, self.idle_pause = max(1, min_claim), idle_pause
        self._cond = threading.Condition()
        self._buffer: deque[Claimed] = deque()
        self._paused = self._stopping = False
        self._idle_until = 0.0
        self._started = self._finished = self._empty = 0  # claim sequence numbers
        self._in_transit = 0  # taken, not yet in the engine's rows (see landed)
        self._thread = threading.Thread(target=self._run, name="lorry-claimer", daemon=True)

    # -- engine side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def take(self, n: int) -> list[Claimed]:
        """Up to n buffered jobs, oldest first; they count as outstanding until ``landed``
        (else the claimer, woken in between, claimed their rows again: up to twice
        ``capacity`` held)."""
        with self._cond:
            out = [self._buffer.popleft() for _ in range(min(n, len(self._buffer)))]
            self._in_transit += len(out)
            return out

    def landed(self, n: int) -> None:
        """n taken jobs are in the engine's rows now (or ended): wake the claimer to refill."""
        with self._cond:
            self._in_transit = max(0, self._in_transit - n)
            self._cond.notify_all()

    def wait_for_work(self, timeout: float) -> str:
        """The engine is idle: claim now. Returns "work" (jobs buffered), "empty" (a claim
        started after this call found nothing) or "timeout"."""
        deadline = time.monotonic() + timeout
        with self._cond:
            ticket = self._started
            self._idle_until = 0.0
            self._cond.notify_all()
            while not self._buffer and self._empty <= ticket:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                self._cond.wait(left)
            return "work" if self._buffer else "empty"

    def pause(self) -> None:
        """Claim nothing more (a time limit passed); buffered jobs stay until ``stop``."""
        with self._cond:
            self._paused = True

    def stop(self) -> list[Claimed]:
        """Stop claiming (waits for a claim in flight) and return every buffered job."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        with self._cond:
            left, self._buffer = list(self._buffer), deque()
        return left

    def buffered(self) -> list[Claimed]:
        with self._cond:
            return list(self._buffer)

    def drop(self, job_ids: set[str]) -> list[Claimed]:
        """Remove buffered jobs (cancelled while waiting); returns those removed."""
        with self._cond:
            gone = [c for c in self._buffer if c.job.id in job_ids]
            self._buffer = deque(c for c in self._buffer if c.job.id not in job_ids)
            return gone

    # -- the claimer thread --------------------------------------------------------------------
    def _want(self) -> int:
        free = self.capacity - self._engine_rows() - len(self._buffer) - self._in_transit
        if self._paused or free <= 0 or time.monotonic() < self._idle_until:
            return 0
        return free if free >= self.min_claim or not self._buffer else 0

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._stopping and not (want := self._want()):
                    wait = self._idle_until - time.monotonic()
                    self._cond.wait(wait if wait > 0 else 0.05)
                if self._stopping:
                    return
                self._started += 1
                seq = self._started
            try:
                batches = self._claim(want)
                failures = 0
            except Exception as e:  # database away or slow: the engine keeps decoding
                log.warning("claim failed (%s: %s); retrying", type(e).__name__, e)
                time.sleep(backoff(failures))
                failures += 1
                continue
            jobs = [Claimed(job, mb.adapter) for mb in batches for job in mb.jobs]
            with self._cond:
                self._buffer.extend(jobs)
                self._finished = seq
                if not jobs:
                    self._empty = seq
                    self._idle_until = time.monotonic() + self.idle_pause
                self._cond.notify_all()


@dataclass
class WriteOp:
    """One write for the writer: "complete" (result, cancelled), "fail" (message; retryable:
    queued again while attempts are left), "release"."""

    kind: str
    job: object  # scheduler.ClaimedJob
    result: object = None
    cancelled: bool = False
    message: str = ""
    retryable: bool = False
    extra: dict = field(default_factory=dict)  # for on_done (timings, tokens)


class Writer:
    """Writes finished jobs on its own thread: consecutive results go in one ``complete_many``
    transaction; fails and releases one by one. While the database is away the ops wait, in
    order, in a bounded queue (``put`` blocks when ``max_pending`` wait, besides the batch of
    at most ``max_pending`` being written) and are written when it is back.
    ``on_done(op, written)`` runs after each op (summary, stats, progress)."""

    def __init__(self, queue, on_done: Callable, max_pending: int, max_batch: int = 256):
        self.queue, self._on_done = queue, on_done
        self.max_batch = max(1, min(max_batch, max_pending))
        self._ops: queue_lib.Queue[WriteOp] = queue_lib.Queue(maxsize=max(1, max_pending))
        self._pending: list[WriteOp] = []  # taken from _ops, not written yet
        self._lock = threading.Lock()
        self._put = self._done = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lorry-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def on_done(self, op: WriteOp, written: bool) -> None:
        try:
            self._on_done(op, written)
        except Exception:  # a progress callback's error must not stop the recording
            log.exception("on_result callback failed for %s", op.job.id)

    def put(self, op: WriteOp) -> None:
        with self._lock:
            self._put += 1
        self._ops.put(op)

    def pending_jobs(self) -> list:
        """Jobs whose write is not done (their leases are still heartbeated)."""
        with self._lock:
            return [op.job for op in self._pending] + [op.job for op in list(self._ops.queue)]

    def flush(self, timeout: float) -> bool:
        """Wait until every op put so far is written; False if the time ran out."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._put
        while self._done < target:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.002)
        return True

    def stop(self) -> None:
        """Stop the thread; ops not written by now are dropped (their jobs re-run after the
        lease, as after a crash)."""
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            if not self._pending:
                try:
                    op = self._ops.get(timeout=0.05)
                except queue_lib.Empty:
                    if self._stopping.is_set():
                        return
                    continue
                with self._lock:
                    self._pending.append(op)
            with self._lock:
                while len(self._pending) < self.max_batch:
                    try:
                        self._pending.append(self._ops.get_nowait())
                    except queue_lib.Empty:
                        break
                batch = list(self._pending)
            try:
                written = self._write(batch)
            except Exception:  # an op the database refuses for good: drop it, keep writing
                log.exception("cannot write %s for %s; its job runs again after its lease",
                              batch[0].kind, batch[0].job.id)
                written = 1
            with self._lock:
                del self._pending[:written]
                self._done += written
            if not written and self._stopping.is_set():
                return

    def _write(self, batch: list[WriteOp]) -> int:
        """Write the leading ops of batch; returns how many are done (0: database away)."""
        for attempt in range(len(BACKOFF) + 1):
            if self._stopping.is_set() and attempt:
                return 0  # shutting down with the database away: these jobs re-run later
            try:
                return self._write_once(batch)
            except UNAVAILABLE as e:
                log.warning("results wait for the database (%s: %s)", type(e).__name__, e)
                time.sleep(backoff(attempt))
        return 0

    def _write_once(self, batch: list[WriteOp]) -> int:
        first = batch[0]
        if first.kind != "complete":
            self._one(first)
            return 1
        run = [op for op in _leading(batch, "complete")]
        try:
            written = self.queue.complete_many([(op.job.id, op.job.lease_token, op.result,
                                                 op.cancelled) for op in run])
        except UNAVAILABLE:
            raise
        except Exception:  # one result the database refuses: find it by writing one by one
            for op in run:
                self._one(op)
            return len(run)
        for op in run:
            self.on_done(op, op.job.id in written)
        return len(run)

    def _one(self, op: WriteOp) -> None:
        job = op.job
        if op.kind == "release":
            self.on_done(op, self.queue.release(job.id, job.lease_token))
        elif op.kind == "fail":
            self.on_done(op, self.queue.fail(job.id, job.lease_token, op.message,
                                             retryable=op.retryable))
        else:
            try:
                written = self.queue.complete(job.id, job.lease_token, op.result,
                                              cancelled=op.cancelled)
            except UNAVAILABLE:
                raise
            except Exception as e:  # a result the database refuses fails this job only
                log.exception("cannot store the result of %s", job.id)
                message = (f"the result could not be stored: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300]}")
                self.on_done(WriteOp("fail", job, message=message),
                             self.queue.fail(job.id, job.lease_token, message, retryable=False))
                return
            self.on_done(op, written)


def _leading(batch: list[WriteOp], kind: str):
    for op in batch:
        if op.kind != kind:
            return
        yield op
