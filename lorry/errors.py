"""Errors the Python client raises: every non-2xx answer becomes a LorryError with its status."""
from __future__ import annotations


class LorryError(Exception):
    """The server refused a request (or could not be reached).

    Attributes
    ----------
    status : int
        HTTP status code (0 when no answer came back).
    message : str
        The server's explanation (``error.message`` of the JSON error body).
    detail : object
        The raw ``error`` object: ``{"message", "type", "param", "code"}`` (and ``lines``,
        the per-line errors of a refused batch upload).
    type, code, param : str or None
        The error's ``type`` (e.g. ``invalid_request_error``), ``code`` (e.g.
        ``finite_number``, ``quota_exceeded``) and the request field it is about.
    retry_after : float or None
        Seconds the server asks to wait before trying again (429, 503).
    """

    def __init__(self, status: int, message: str, detail=None, *, retry_after=None):
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.detail = detail
        info = detail if isinstance(detail, dict) else {}
        self.type, self.code, self.param = info.get("type"), info.get("code"), info.get("param")
        self.retry_after = retry_after


class NotFound(LorryError):
    """404: no such job/batch/adapter for this tenant."""


class Unauthorized(LorryError):
    """401: missing or invalid API key."""


class InvalidRequest(LorryError):
    """400/409/413/422: the request was refused; ``param`` and ``code`` say which field and
    why."""


class QuotaExceeded(LorryError):
    """429: the tenant's queue is full; ``retry_after`` says when to try again."""


class Unavailable(LorryError):
    """503: the server's database cannot be reached for now; ``retry_after`` says when to try
    again."""


class WaitTimeout(LorryError, TimeoutError):
    """wait() gave up before the job or batch reached a final status."""


def error_for(status: int, message: str, detail=None, retry_after=None) -> LorryError:
    """The LorryError subclass for an HTTP status."""
    cls = {401: Unauthorized, 404: NotFound, 429: QuotaExceeded, 503: Unavailable}.get(status)
    if cls is None:
        cls = InvalidRequest if status in (400, 409, 413, 422) else LorryError
    return cls(status, message, detail, retry_after=retry_after)
