"""Flower behind its own authentication on every page: Flower serves ``/metrics`` and
``/healthcheck`` without asking for credentials even when ``--basic-auth`` is set, so their
handlers are replaced by ones that check the credentials first."""
from __future__ import annotations

OPEN_PATHS = ("/metrics", "/healthcheck")


def _guarded(handler_cls: type) -> type:
    from tornado.web import HTTPError

    class Guarded(handler_cls):
        def prepare(self):
            # Flower's own check: basic auth raises 401; an OAuth session missing gives None.
            if not self.current_user:
                raise HTTPError(401)
            return super().prepare()

    Guarded.__name__ = Guarded.__qualname__ = f"Authenticated{handler_cls.__name__}"
    return Guarded


def protect_open_handlers() -> None:
    """Put Flower's authentication in front of its public ``OPEN_PATHS`` (in its URL table,
    before the app is built). Raises RuntimeError when a path is not where it is expected,
    so that a Flower release that moved them is not served with them open."""
    from flower import urls

    found = set()
    for i, entry in enumerate(urls.handlers):
        if isinstance(entry, tuple) and entry[0] in OPEN_PATHS:
            if not entry[1].__name__.startswith("Authenticated"):
                urls.handlers[i] = (entry[0], _guarded(entry[1]), *entry[2:])
            found.add(entry[0])
    missing = sorted(set(OPEN_PATHS) - found)
    if missing:
        raise RuntimeError(f"cannot protect Flower's {missing}: not in flower.urls.handlers of "
                           "this Flower version; refusing to serve them without credentials")
