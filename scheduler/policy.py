"""Claim policy, pure Python: which queued groups a worker takes, and how many jobs from each.

Order of preference: groups whose oldest job waited past the aging bound (oldest first), then
the interactive class (priority >= INTERACTIVE_PRIORITY: the API's synchronous completions)
before bulk, then tenant fair share, then the tenant's own priority (it orders that tenant's
groups only: a tenant that sets priority 100 on every job does not pass anyone else), then
adapter affinity (hot here > warm here > cold > hot on another live worker), then a
per-worker spread. Fair share decides whose jobs come
next; affinity only orders the groups of tenants that are equally due (a cold adapter is no
reason to pass a tenant over: a GPU swap costs about a millisecond). Fair share is weighted
deficit round robin kept as virtual time: a tenant's counter grows by jobs/weight when it is
served, the active tenants with the smallest counter (in quanta of one claim per live worker)
are served next, and a tenant that becomes active starts one engine's rows per live worker
(the head start) behind the leader: it cannot bank more credit while idle, and behind a
flooder it is served at the next claim, up to a full engine's rows before they alternate.

Adapters are AdapterInfo ids: two tenants' adapters of the same name are different adapters.
"""
from __future__ import annotations

import heapq
import zlib
from dataclasses import dataclass, field

BASE_MODEL = 0  # adapter id of jobs without adapter
# Jobs at or above this priority are the interactive class (the API's synchronous and
# streaming completions), served before bulk work of any tenant; tenants' own priorities
# (-100..100 on the REST API) stay below it and order only their own jobs.
INTERACTIVE_PRIORITY = 1000


@dataclass(frozen=True)
class Group:
    """Queued jobs of one (tenant, adapter, priority); oldest is seconds since the epoch."""

    tenant_id: str
    adapter_id: int
    priority: int
    queued: int
    oldest: float

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.tenant_id, self.adapter_id, self.priority)


@dataclass
class Snapshot:
    """What the policy sees: candidate groups and the asking worker's state."""

    groups: list[Group]
    now: float
    free_slots: int
    hot: set[int] = field(default_factory=set)
    warm: set[int] = field(default_factory=set)
    hot_elsewhere: set[int] = field(default_factory=set)
    weights: dict[str, float] = field(default_factory=dict)  # missing tenant -> 1.0
    served: dict[str, float] = field(default_factory=dict)   # fair-share counters
    aging_seconds: float = 300.0
    # Spreads concurrent claimers over equally good groups (e.g. the worker id), so that
    # they do not all reach for the same rows and come back short (SKIP LOCKED).
    salt: str = ""
    max_adapters: int | None = None  # distinct adapters per claim (None: no cap)
    # Live workers claiming (this one included): tenants whose counters are within one
    # claim per worker of each other are equally due, so concurrent claimers spread over
    # them instead of all reaching for the few furthest behind (and coming back short).
    workers: int = 1
    # The asking worker's engine rows (max_num_seqs, as its heartbeat recorded them; 0:
    # unknown): with the live workers, the head start of a tenant that becomes active.
    capacity: int = 0


@dataclass(frozen=True)
class Take:
    group: Group
    count: int


@dataclass(frozen=True)
class Plan:
    takes: list[Take]
    # Smallest active counter: a served tenant's counter becomes max(counter, floor) + jobs/weight
    # (applied in SQL with the jobs actually claimed, so concurrent claimers add up).
    floor: float = 0.0
    # Further groups in the same order, up to `spare` jobs (plan_claim's argument): a claim
    # statement takes from them only what the takes could not give (rows leased by another
    # claimer in the meantime).
    spares: list[Take] = field(default_factory=list)


def affinity_tier(adapter_id: int, snap: Snapshot) -> int:
    """0 hot here (or base model: nothing to load), 1 warm here, 2 cold, 3 hot elsewhere."""
    if adapter_id == BASE_MODEL or adapter_id in snap.hot:
        return 0
    if adapter_id in snap.warm:
        return 1
    return 3 if adapter_id in snap.hot_elsewhere else 2


def plan_claim(snap: Snapshot, spare: int = 0) -> Plan:
    """Choose up to snap.free_slots jobs from snap.groups (see the module docstring), then up
    to `spare` more as Plan.spares."""
    now, free = snap.now, snap.free_slots
    groups = [g for g in snap.groups if g.queued > 0 and g.oldest <= now]  # keys distinct
    if not groups or free <= 0:
        return Plan([])
    floor, virtual = _virtual_times(snap, groups)
    # Tenants within one quantum (a full claim of a weight-1 tenant per live worker) of each
    # other are equally due, as in deficit round robin.
    quantum = float(free * max(snap.workers, 1))
    share = {t: int(v // quantum) for t, v in virtual.items()}
    takes, spares = _fill(_ordered(snap, groups, share), snap, share, virtual, quantum,
                          max(spare, 0))
    return Plan(takes, floor, spares)


def _virtual_times(snap: Snapshot, groups: list[Group]) -> tuple[float, dict[str, float]]:
    """The floor (the smallest active counter, or the head start behind the leader) and each
    candidate tenant's fair-share counter raised to it. A backlogged tenant is never more
    than about one quantum behind the others; one further behind than the head start was
    idle (or new) and may not spend more banked credit."""
    weights, all_served = snap.weights, snap.served
    served = {}
    for g in groups:
        if g.tenant_id not in served:
            served[g.tenant_id] = all_served.get(g.tenant_id, 0.0)
    head = float(max(snap.free_slots, snap.capacity) * max(snap.workers, 1))
    lowest, lead = float("inf"), float("-inf")
    for t, v in served.items():
        w = weights.get(t, 1.0)
        start = v - head / (w if w > 1e-9 else 1e-9)
        if start > lead:
            lead = start
        if v < lowest:
            lowest = v
    floor = max(lowest, lead)
    return floor, {t: v if v > floor else floor for t, v in served.items()}


def _ordered(snap: Snapshot, groups: list[Group], share: dict[str, int]) -> list:
    """The groups as a heap of (order, tenant's share when pushed (-1: overdue), group).
    Order: (overdue first, interactive first, tenant's share, -priority, affinity tier,
    spread, key); overdue groups by their oldest job only."""
    cutoff = snap.now - snap.aging_seconds
    salt = snap.salt
    hot, warm, elsewhere = snap.hot, snap.warm, snap.hot_elsewhere
    spreads = _SPREADS
    if len(spreads) > 100_000:
        spreads.clear()
    heap = []
    for g in groups:
        t, a = g.tenant_id, g.adapter_id
        key = (t, a, g.priority)
        if g.oldest <= cutoff:  # overdue: bound the longest wait first
            heap.append(((0, g.oldest, 0, 0, 0, 0, key), -1, g))
            continue
        # affinity_tier(), inlined: this loop runs for every candidate at every claim.
        tier = (0 if a == BASE_MODEL or a in hot else 1 if a in warm
                else 3 if a in elsewhere else 2)
        # Among groups equally due, spread concurrent claimers apart.
        spread = spreads.get((salt, t, a))
        if spread is None:
            spread = spreads[(salt, t, a)] = zlib.crc32(f"{salt}:{t}:{a}".encode())
        s = share[t]
        interactive = 0 if g.priority >= INTERACTIVE_PRIORITY else 1
        heap.append(((1, interactive, s, -g.priority, tier, spread, key), s, g))
    heapq.heapify(heap)
    return heap


def _fill(heap: list, snap: Snapshot, share: dict[str, int], virtual: dict[str, float],
          quantum: float, spare: int) -> tuple[list[Take], list[Take]]:
    """Take groups off the heap in order until the free slots and then `spare` more jobs are
    planned; (takes, spares). Serving a tenant raises its counter and share. A tenant's share
    only grows while planning, so a heap with lazily refreshed entries pops the true minimum."""
    weights = snap.weights
    takes: list[Take] = []
    spares: list[Take] = []
    adapters: set[int] = set()
    remaining = snap.free_slots + spare
    cap = snap.max_adapters
    while remaining > 0 and heap:
        order, seen, g = heapq.heappop(heap)
        t = g.tenant_id
        if seen >= 0 and seen != share[t]:  # its tenant was served since: re-queue
            heapq.heappush(heap, (order[:2] + (share[t],) + order[3:], share[t], g))
            continue
        if cap is not None and len(adapters) >= cap and g.adapter_id not in adapters:
            continue  # the cap is reached and only grows stricter: drop it
        count = min(g.queued, remaining)
        fill = min(count, max(remaining - spare, 0))  # the part that fills free slots
        if fill:
            takes.append(Take(g, fill))
        if count > fill:  # the rest is spare (a group may be split across the two)
            spares.append(Take(g, count - fill))
        adapters.add(g.adapter_id)
        remaining -= count
        virtual[t] += count / max(weights.get(t, 1.0), 1e-9)
        share[t] = int(virtual[t] // quantum)
    return takes, spares


_SPREADS: dict[tuple, int] = {}  # (salt, tenant, adapter) -> crc32, reused across claims
