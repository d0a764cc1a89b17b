"""Errors the job queue raises; each message says what was wrong, the value, and what is allowed."""
from __future__ import annotations


class QueueError(Exception):
    """Base class of every refusal by the job queue."""


class InvalidJob(QueueError, ValueError):
    """A JobSpec (or batch) that cannot be queued: bad field value or combination."""


class UnknownAdapter(QueueError, LookupError):
    """A job names an adapter that neither the tenant nor the shared catalog holds."""


class AdapterExists(QueueError, ValueError):
    """register_adapter with a name the tenant (or the shared catalog) already uses."""


class UnknownTenant(QueueError, LookupError):
    """A tenant id that does not exist."""


class FileGone(QueueError, LookupError):
    """A file was deleted while its bytes were being read: what was read is not the whole
    file."""


class AdapterLimit(QueueError):
    """register_adapter past the tenant's adapter limit (deleting adapters helps, waiting
    does not)."""


class StorageFull(QueueError):
    """An upload would put more bytes in the tenant's files than the storage limit allows
    (waiting does not help: deleting files does)."""

    def __init__(self, tenant_id: str, stored: int, adding: int, limit: int):
        self.tenant_id, self.stored, self.adding, self.limit = tenant_id, stored, adding, limit
        what = (f"this upload of {adding} bytes would pass the limit" if adding else
                "a new batch (its refused lines, output and error files) would pass the limit")
        super().__init__(
            f"your files hold {stored} bytes; {what} of {limit} bytes per tenant "
            f"(LORRY_MAX_FILE_BYTES_PER_TENANT): delete files you no longer need "
            f"(DELETE /v1/files/{{id}}), then try again")


class QuotaExceeded(QueueError):
    """Submitting would put more jobs in the tenant's queue than its max_queued allows."""

    def __init__(self, tenant_id: str, queued: int, requested: int, max_queued: int):
        self.tenant_id, self.queued = tenant_id, queued
        self.requested, self.max_queued = requested, max_queued
        never = self.never_fits
        super().__init__(
            f"tenant {tenant_id!r} has {queued} queued job(s); submitting {requested} more "
            f"would exceed its max_queued quota of {max_queued}"
            + ("; that is more than the whole quota, so it can never be queued: submit at "
               f"most {max_queued} at a time" if never else ""))

    @property
    def never_fits(self) -> bool:
        """More jobs than the whole quota: waiting for the queue to drain cannot help."""
        return self.requested > self.max_queued


class Unavailable(QueueError):
    """The job database cannot be reached (down, restarting, refusing or dropping
    connections); try again later. A submit whose answer was lost this way may have been
    queued: retry it with the same idempotency_key to be sure it is queued once."""

    def __init__(self, message: str = "the job database cannot be reached; try again later"):
        super().__init__(message)


class ConnectionLost(Unavailable):
    """The connection broke during the call (server restart, failover, killed backend). It
    is dropped from its pool, so the same call made again opens a new one; a write whose
    answer was lost may have been applied."""


class NotMigrated(QueueError):
    """The job database is at an older migration than this code's newest, or at none: this
    code's statements would meet columns or tables that are not there (a worker's results
    could not be stored). ``lorry db upgrade`` migrates it; a database a newer Lorry migrated
    is no refusal (migrations only add)."""

    def __init__(self, current: str | None, head: str, where: str = ""):
        self.current, self.head = current, head
        database = f"the job database {where}" if where else "the job database"
        at = f"is at migration {current}" if current else "has no Lorry migration applied"
        super().__init__(f"{database} {at}, this Lorry needs {head}: run `lorry db upgrade` "
                         "first")


class Retryable(QueueError):
    """The database aborted the call's transaction to resolve a conflict with a concurrent
    one (deadlock, serialization failure): nothing of it was applied, so making the same
    call again is safe."""

    def __init__(self, message: str = "the job database aborted the transaction to resolve a "
                                      "conflict with a concurrent one; nothing was applied: "
                                      "try again"):
        super().__init__(message)


class DuplicateKey(QueueError):
    """A write met a row that holds the same unique key (another call stored it first, e.g.
    with the same idempotency key)."""

    def __init__(self, message: str = "another request stored the same unique key first "
                                      "(e.g. the same idempotency key); read that object"):
        super().__init__(message)
