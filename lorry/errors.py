"""Errors the Python client raises: every non-2xx answer becomes a LorryError with its status."""
from __future__ import annotations


class LorryError(Exception):
    """The server refused a request (or could not be reached).

    Attributes
    ----------
    status : int
        HTTP status code (0 when no answer came back).
    message : str
        The server's explanation (``detail`` of the JSON error body).
    detail : object
        The raw ``detail`` (a list of field errors for 422 answers).
    """

    def __init__(self, status: int, message: str, detail=None):
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.detail = detail


class NotFound(LorryError):
    """404: no such job/batch/adapter for this tenant."""


class Unauthorized(LorryError):
    """401: missing or invalid API key."""


class InvalidRequest(LorryError):
    """400/413/422: the request was refused; ``detail`` says which field and why."""


class WaitTimeout(LorryError, TimeoutError):
    """wait() gave up before the job or batch reached a final status."""


def error_for(status: int, message: str, detail=None) -> LorryError:
    """The LorryError subclass for an HTTP status."""
    cls = {401: Unauthorized, 404: NotFound}.get(status)
    if cls is None:
        cls = InvalidRequest if status in (400, 409, 413, 422) else LorryError
    return cls(status, message, detail)
