"""Claim loops that the queue's concurrency tests run in child processes (spawned children
import them by name, so they live on the tests' sys.path, not in a test module)."""
from __future__ import annotations

import threading

from lorry.scheduler import JobQueue


def drain(url: str, worker: str, out: list, lock: threading.Lock) -> None:
    """Claim 7 at a time until nothing is left; the claimed ids go into ``out``."""
    q = JobQueue(url, create=False)
    try:
        while True:
            got = [j.id for mb in q.claim(worker, hot=[], warm=[], free_slots=7) for j in mb.jobs]
            if not got:
                return
            with lock:
                out.extend(got)
    finally:
        q.close()


def drain_process(url: str, worker: str, conn) -> None:
    """``drain`` in a child process; the ids go back through ``conn``."""
    out: list = []
    drain(url, worker, out, threading.Lock())
    conn.send(out)
    conn.close()


def claim_then_hang(url: str, conn) -> None:
    """Claim 5 jobs, send their ids, then hold the leases until killed."""
    q = JobQueue(url, create=False)
    got = [j.id for mb in q.claim("doomed", hot=[], warm=[], free_slots=5, lease_seconds=60)
           for j in mb.jobs]
    conn.send(got)
    threading.Event().wait()
