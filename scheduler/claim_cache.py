"""A worker's claim snapshot kept between claims (PostgreSQL), adjusted locally after each of
its own claims, so that most claims are one statement. Pure Python, no SQL.

A cached snapshot is used only while all of these hold (else the claim reads a fresh one):
- it is younger than the TTL, by the monotonic clock and by the queue's clock;
- no writer of queue_groups or of a worker row ran in this process since (`GENERATION`);
- every adapter the worker names as hot/warm was resolved by it or claimed since;
- every claim made from it got all the jobs it planned (otherwise another claimer, a
  deadline or a cancel changed the groups), and no tenant lost its last known group;
- the plan it gives fills the free slots (a short plan is re-made from a fresh snapshot).
Within the TTL a claimer does not see other claimers' service to tenants (they see it at
their next refresh), nor adapters that became hot on other workers. Adapters that became hot
here by this worker's own claims bring the groups claimed from; their other tenants' groups
(shared adapters) join at the next refresh.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from scheduler.policy import Group, Plan

# Bumped by every write to queue_groups (other than a claim's) and to worker rows made in
# this process: a cached snapshot from before such a write is not used again.
GENERATION = [0]


def bump_generation() -> None:
    GENERATION[0] += 1


@dataclass
class ClaimSnapshot:
    """Candidate groups, their tenants' weights and fair-share counters, the asking worker's
    stored row and the hot adapters of other live workers, as read at `read_at`."""

    groups: dict[tuple, Group]
    weights: dict[str, float]
    served: dict[str, float]
    others: set[int]
    refs: tuple                     # (hot refs, warm refs) as the worker passed them
    hot: list[int]                  # resolved ids, sorted
    warm: list[int]
    written: tuple | None           # the worker row as stored: (hot, warm, heartbeat_at)
    read_at: datetime               # queue clock
    read_mono: float                # time.monotonic()
    generation: int
    existing: set[int] = field(default_factory=set)   # adapter ids known to exist
    requested: set[int] = field(default_factory=set)  # int refs resolved at read time

    def usable(self, now: datetime, mono: float, ttl: float) -> bool:
        age = (now - self.read_at).total_seconds()
        return (GENERATION[0] == self.generation and 0 <= mono - self.read_mono <= ttl
                and -ttl <= age <= ttl)

    def resolve(self, hot, warm) -> tuple[list[int], list[int]] | None:
        """The worker's hot/warm as sorted ids, or None when this snapshot cannot tell."""
        refs = (tuple(hot or ()), tuple(warm or ()))
        if refs == self.refs:
            return self.hot, self.warm
        out, existing, requested = [], self.existing, self.requested
        for side in refs:
            ids = set()
            for r in side:
                if r in existing and isinstance(r, int):
                    ids.add(r)
                elif r not in requested or not isinstance(r, int):
                    return None  # a name, or an id this snapshot never saw
            out.append(sorted(ids))
        return out[0], out[1]

    def worker_stale(self, hot: list[int], warm: list[int], now: datetime,
                     refresh_s: float) -> bool:
        """Whether the stored worker row needs rewriting (caches changed, heartbeat old)."""
        if self.written is None:
            return True
        w_hot, w_warm, beat = self.written
        return (w_hot != hot or w_warm != warm or beat is None
                or (now - beat).total_seconds() > refresh_s)

    def apply(self, plan: Plan, got: dict[tuple, tuple[int, float]]) -> bool:
        """Account this worker's claim: got maps group key -> (jobs claimed, newest claimed
        job's enqueue time in epoch seconds). Mirrors what the claim statement wrote to
        queue_groups and tenants. Returns False when the snapshot must not be used again."""
        ok = True
        per_tenant: dict[str, int] = {}
        for take in plan.takes:
            key = take.group.key
            n, last = got.get(key, (0, None))
            if n < take.count:
                ok = False  # someone else took (or cancelled/expired) jobs of this group
            if n == 0:
                continue
            per_tenant[key[0]] = per_tenant.get(key[0], 0) + n
            g = self.groups.get(key)
            if g is None:
                continue
            left = g.queued - n
            if left > 0:
                self.groups[key] = Group(g.tenant_id, g.adapter_id, g.priority, left,
                                         max(g.oldest, last))
            else:
                del self.groups[key]
                if not any(k[0] == key[0] for k in self.groups):
                    ok = False  # the tenant may have groups this snapshot does not show
            self.existing.add(key[1])
        for tenant, n in per_tenant.items():
            w = max(self.weights.get(tenant, 1.0), 1e-9)
            self.served[tenant] = max(self.served.get(tenant, 0.0), plan.floor) + n / w
        return ok
