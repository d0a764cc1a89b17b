"""Per tenant, the expensive requests one API process is serving at once (completions waiting
for or streaming their job, batch ingests), so that one tenant's many connections cannot take
the database reads, threads, Redis connections and disk that every tenant's requests share.
A tenant at its limit is answered 429 before anything is queued or read."""
from __future__ import annotations

import time

from fastapi import Request

from lorry.api.errors import ApiError

KINDS = {  # kind -> (what the message calls them, their setting, Retry-After seconds)
    "completions": ("completions open (waiting or streaming)", "LORRY_MAX_OPEN_COMPLETIONS",
                    1),
    "ingests": ("batches being created", "LORRY_MAX_OPEN_INGESTS", 5),
}


class TenantSlots:
    """``enter`` takes one of the tenant's slots (429 ``too_many_open_<kind>`` at the limit),
    ``leave`` gives it back. With ``stale_after``, a slot held longer counts no more (a
    safety net: every answer ends by then, and gives its slot back as it ends)."""

    def __init__(self, kind: str):
        self.kind = kind
        self.open: dict[str, dict[int, float]] = {}
        self._next = 0

    def enter(self, tenant_id: str, limit: int, stale_after: float | None = None) -> int:
        mine = self.open.setdefault(tenant_id, {})
        now = time.monotonic()
        if len(mine) >= limit and stale_after is not None:
            for k in [k for k, t in mine.items() if now - t > stale_after]:
                del mine[k]
        if len(mine) >= limit:
            what, setting, retry = KINDS[self.kind]
            raise ApiError(429, f"you have {len(mine)} {what} on this server, the most "
                                f"allowed ({setting}); retry when one has ended",
                           code=f"too_many_open_{self.kind}",
                           headers={"Retry-After": str(retry)})
        self._next += 1
        mine[self._next] = now
        return self._next

    def leave(self, tenant_id: str, token: int) -> None:
        mine = self.open.get(tenant_id)
        if mine is not None:
            mine.pop(token, None)
            if not mine:
                del self.open[tenant_id]


def tenant_slots(request: Request, kind: str) -> TenantSlots:
    """The app's slots of this kind (made at first use; requests run on one event loop)."""
    state = request.app.state
    slots = getattr(state, "tenant_slots", None)
    if slots is None:
        slots = state.tenant_slots = {}
    if kind not in slots:
        slots[kind] = TenantSlots(kind)
    return slots[kind]
