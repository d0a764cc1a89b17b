"""Claim policy, pure Python: which queued groups a worker takes, and how many jobs from each.

Order of preference: groups whose oldest job waited past the aging bound (oldest first), then
higher priority, then adapter affinity (hot here > warm here > cold > hot on another live
worker), then tenant fair share, then a per-worker spread. Fair share is weighted deficit round
robin kept as virtual time: a tenant's counter grows by jobs/weight when it is served, the
active tenant with the smallest counter (in quanta of one claim) is served next, and a tenant
that becomes active starts near the others (it cannot bank credit while idle).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

BASE_MODEL = 0  # adapter id of jobs without adapter


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


def affinity_tier(adapter_id: int, snap: Snapshot) -> int:
    """0 hot here (or base model: nothing to load), 1 warm here, 2 cold, 3 hot elsewhere."""
    if adapter_id == BASE_MODEL or adapter_id in snap.hot:
        return 0
    if adapter_id in snap.warm:
        return 1
    return 3 if adapter_id in snap.hot_elsewhere else 2


def plan_claim(snap: Snapshot) -> Plan:
    """Choose up to snap.free_slots jobs from snap.groups; see the module docstring."""
    left = {g.key: g.queued for g in snap.groups if g.queued > 0 and g.oldest <= snap.now}
    groups = {g.key: g for g in snap.groups if g.key in left}
    active = {g.tenant_id for g in groups.values()}
    if not active or snap.free_slots <= 0:
        return Plan([])
    quantum = float(snap.free_slots)
    served = {t: snap.served.get(t, 0.0) for t in active}
    # A backlogged tenant is never more than about one quantum behind the leader's last
    # start; one further behind was idle (or new) and may not spend banked credit.
    floor = max(min(served.values()), max(
        v - quantum / max(snap.weights.get(t, 1.0), 1e-9) for t, v in served.items()))
    virtual = {t: max(v, floor) for t, v in served.items()}
    cutoff = snap.now - snap.aging_seconds

    static: dict[tuple, tuple] = {}
    for g in groups.values():
        if g.oldest <= cutoff:  # overdue: bound the longest wait first
            static[g.key] = (0, g.oldest, 0, 0, g.key)
        else:
            # Among groups equally due, spread concurrent claimers apart.
            spread = zlib.crc32(f"{snap.salt}:{g.tenant_id}:{g.adapter_id}".encode())
            static[g.key] = (1, -g.priority, affinity_tier(g.adapter_id, snap), spread, g.key)
    # Tenants within one quantum (a full claim of a weight-1 tenant) of each other are equally
    # due, as in deficit round robin.
    share = {t: int(v // quantum) for t, v in virtual.items()}

    def order(g: Group) -> tuple:
        s = static[g.key]
        return (s[0], s[1], s[2], 0 if s[0] == 0 else share[g.tenant_id], s[3], s[4])

    takes: list[Take] = []
    adapters: set[int] = set()
    remaining = snap.free_slots
    while remaining > 0 and left:
        candidates = [groups[k] for k in left]
        if snap.max_adapters is not None and len(adapters) >= snap.max_adapters:
            candidates = [g for g in candidates if g.adapter_id in adapters]
            if not candidates:
                break
        best = min(candidates, key=order)
        count = min(left[best.key], remaining)
        takes.append(Take(best, count))
        adapters.add(best.adapter_id)
        remaining -= count
        left[best.key] -= count
        if left[best.key] == 0:
            del left[best.key]
        virtual[best.tenant_id] += count / max(snap.weights.get(best.tenant_id, 1.0), 1e-9)
        share[best.tenant_id] = int(virtual[best.tenant_id] // quantum)
    return Plan(takes, floor)
