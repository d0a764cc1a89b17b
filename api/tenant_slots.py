"""Per tenant, the expensive requests being served at once (completions waiting for or
streaming their job, batch ingests), so that one tenant's many connections cannot take the
database reads, threads, Redis connections and disk that every tenant's requests share.
A tenant at its limit is answered 429 before anything is queued or read.

The count is the service's, across its API processes (``lorry api --workers N``, or several
hosts), wherever they share the Redis that ``/metrics`` reads: a slot is a member of a Redis
sorted set per tenant and kind, scored by when it lapses; each process renews the slots it
holds every few seconds, so those of a process that died lapse within ``SLOT_TTL`` seconds.
While Redis cannot be reached, each process counts its own slots (the limit then holds per
process) and asks Redis again after ``REDIS_RETRY`` seconds."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from lorry.api.errors import ApiError

log = logging.getLogger(__name__)

KINDS = {  # kind -> (what the message calls them, their setting, Retry-After seconds)
    "completions": ("completions open (waiting or streaming)", "LORRY_MAX_OPEN_COMPLETIONS",
                    1),
    "ingests": ("batches being created", "LORRY_MAX_OPEN_INGESTS", 5),
}
SLOT_TTL = 30.0      # seconds a slot lasts in Redis unless its process renews it
RENEW_EVERY = 5.0    # seconds between a process's renewals of the slots it holds
REDIS_RETRY = 30.0   # seconds counting per process after Redis could not be reached
GIVE_WAIT_S = 0.25   # the most an answer waits for its slot's release in Redis

# KEYS[1]: the tenant's set; ARGV: limit, ttl, member. Lapsed slots go first; the server's
# clock scores them, so API hosts' clocks need not agree. -> {taken 1/0, slots held}
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then return {0, n} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000) + 1000)
return {1, n + 1}
"""
# KEYS: sets; ARGV[1]: ttl, then per key its member. Renews only slots still there.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
for i, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[i + 1]) > 0 then
    redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
  end
end
return 0
"""


class TenantSlots:
    """``enter`` takes one of the tenant's slots (429 ``too_many_open_<kind>`` at the limit),
    ``leave`` gives it back. With ``stale_after``, a slot held longer counts no more (a
    safety net: every answer ends by then, and gives its slot back as it ends).

    redis : a redis.Redis client shared by the service's API processes, or None: this
        process's own count only.
    """

    def __init__(self, kind: str, redis=None, prefix: str = "lorry", ttl: float = SLOT_TTL,
                 renew_every: float = RENEW_EVERY):
        self.kind, self.redis, self.prefix = kind, redis, prefix
        self.ttl, self.renew_every = ttl, renew_every
        self.open: dict[str, dict[int, float]] = {}   # tenant -> {token: taken at}, here
        self._next = 0
        self._shared: dict[int, tuple] = {}  # token -> (key, member, since, stale_after)
        self._lock = threading.Lock()                   # _shared, read by the renewer too
        self._renewer: threading.Thread | None = None
        self._giver: ThreadPoolExecutor | None = None
        self._redis_back_at = 0.0
        self._tag = uuid.uuid4().hex[:12]               # this process's slots in Redis

    async def enter(self, tenant_id: str, limit: int, stale_after: float | None = None) -> int:
        now = time.monotonic()
        if stale_after is not None:
            for k in [k for k, t in self.open.get(tenant_id, {}).items()
                      if now - t > stale_after]:
                self._forget(tenant_id, k)
        self._next += 1
        token = self._next
        if self.redis is not None and now >= self._redis_back_at:
            key = f"{self.prefix}:slots:{self.kind}:{tenant_id}"
            member = f"{self._tag}:{token}"
            try:
                taken, held = await run_in_threadpool(
                    self.redis.eval, _TAKE, 1, key, limit, self.ttl, member)
            except Exception as e:  # noqa: BLE001 - count here until Redis is back
                self._redis_back_at = time.monotonic() + REDIS_RETRY
                log.warning("tenant limits count per API process for %.0f s: Redis cannot "
                            "be reached (%s)", REDIS_RETRY, type(e).__name__)
            else:
                if not int(taken):
                    self._refuse(int(held), "across this service's API processes")
                self.open.setdefault(tenant_id, {})[token] = now
                with self._lock:
                    self._shared[token] = (key, member, now, stale_after)
                    self._start_renewer()
                return token
        mine = self.open.setdefault(tenant_id, {})
        if len(mine) >= limit:
            self._refuse(len(mine), "on this API process")
        mine[token] = now
        return token

    async def leave(self, tenant_id: str, token: int) -> None:
        """Gives the slot back: here at once, in Redis from a thread of its own, handed the
        work before the first await (a cancelled request's end cannot skip it) and waited for
        up to GIVE_WAIT_S (the answer goes out once its slot is free for the tenant's next
        request; a Redis that does not answer holds it no longer). While Redis is known to
        be away the slot is left to lapse (it is no longer renewed)."""
        shared = self._forget(tenant_id, token)
        if shared is None or time.monotonic() < self._redis_back_at:
            return
        with self._lock:
            if self._giver is None:
                self._giver = ThreadPoolExecutor(4, thread_name_prefix="lorry-slots")
            done = self._giver.submit(self._give, shared[0], shared[1])
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(done)), GIVE_WAIT_S)
        except asyncio.TimeoutError:
            pass

    def _give(self, key: str, member: str) -> None:
        if time.monotonic() < self._redis_back_at:
            return          # found away meanwhile: the slot lapses by itself
        try:
            self.redis.zrem(key, member)
        except Exception as e:  # noqa: BLE001 - no longer renewed, it lapses by itself
            self._redis_back_at = time.monotonic() + REDIS_RETRY
            log.warning("a tenant slot lapses in %.0f s: Redis cannot be reached (%s)",
                        self.ttl, type(e).__name__)

    def _forget(self, tenant_id: str, token: int):
        mine = self.open.get(tenant_id)
        if mine is not None:
            mine.pop(token, None)
            if not mine:
                del self.open[tenant_id]
        with self._lock:
            return self._shared.pop(token, None)

    def _refuse(self, held: int, where: str):
        what, setting, retry = KINDS[self.kind]
        raise ApiError(429, f"your {what} {where}: {held}, the most allowed ({setting}); "
                            f"retry when one has ended",
                       code=f"too_many_open_{self.kind}", headers={"Retry-After": str(retry)})

    def _start_renewer(self) -> None:  # under self._lock
        if self._renewer is None or not self._renewer.is_alive():
            self._renewer = threading.Thread(target=self._renew, daemon=True,
                                             name=f"lorry-{self.kind}-slots")
            self._renewer.start()

    def _renew(self) -> None:
        """Every renew_every seconds, the slots this process holds last ttl more (those held
        past their stale_after are let lapse); ends when it holds none."""
        while True:
            time.sleep(self.renew_every)
            now = time.monotonic()
            with self._lock:
                held = [(key, member) for key, member, since, stale in self._shared.values()
                        if stale is None or now - since <= stale]
                if not self._shared:
                    self._renewer = None
                    return
            if held:
                try:
                    self.redis.eval(_RENEW, len(held), *[k for k, _ in held], self.ttl,
                                    *[m for _, m in held])
                except Exception as e:  # noqa: BLE001 - tried again at the next beat
                    log.warning("cannot renew %d tenant slots in Redis (%s)", len(held),
                                type(e).__name__)


def slot_client(url: str):
    """The Redis client the slots use: one try per call (redis-py's default retries with
    back-off would hold each request ~3 s whenever Redis is away) and half a second at most
    (a slot's script takes well under a millisecond; a Redis that stopped answering holds a
    request, and a thread of the pool the database calls share, no longer)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                retry=Retry(NoBackoff(), 0))


def tenant_slots(request: Request, kind: str) -> TenantSlots:
    """The app's slots of this kind (made at first use; requests run on one event loop)."""
    state = request.app.state
    slots = getattr(state, "tenant_slots", None)
    if slots is None:
        slots = state.tenant_slots = {}
    if kind not in slots:
        slots[kind] = TenantSlots(kind, getattr(state, "slot_redis", None),
                                  state.settings.redis_prefix)
    return slots[kind]
