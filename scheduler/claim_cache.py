"""A worker's claim snapshot kept between claims (PostgreSQL), adjusted locally after each of
its own claims, so that most claims are one statement. Pure Python, no SQL.

A cached snapshot is used only while all of these hold (else the claim reads a fresh one):
- it is younger than the TTL, by the monotonic clock and by the queue's clock;
- no writer of queue_groups or of a worker row ran in this process since (`GENERATION`);
- every adapter id the worker reports as hot/warm was looked up by it or claimed since;
- the plan it gives fills the free slots (a short plan is re-made from a fresh snapshot);
- the last claim made from it got every job it planned (else other claimers are working
  the same groups, and counts the snapshot shows are out of date);
- no live group went live since shortly before its read that it cannot show: one of a
  tenant it does not know, or of a higher priority than its groups (another process's
  submit). The claim statement checks this first and leases nothing when it finds one;
  the claim is then planned again from a fresh snapshot, so such a newcomer is served at
  once, without waiting for the TTL.
Each claim statement reports back the claimed groups as it left them (so other claimers'
takes from them show), each wanted tenant's next-oldest group (as a fresh snapshot would
show it) and the served tenants' fair-share counters (with other claimers' service).
Within the TTL a claimer does not see other groups change, nor adapters that became hot on
other workers. Adapters that became hot here by this worker's own claims bring the groups
claimed from; their other tenants' groups (shared adapters) join at the next refresh.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from lorry.scheduler.policy import Group, Plan

# Bumped by every write to queue_groups (other than a claim's) and to worker rows made in
# this process: a cached snapshot from before such a write is not used again.
GENERATION = [0]
# A submit's jobs carry the time it started, which precedes its commit: a group made live by
# a submit that started up to this long before a snapshot's read but committed after it is
# still found by ClaimSnapshot.unseen_filter.
UNSEEN_MARGIN_S = 10.0


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
    workers: int                    # live workers (this one included)
    refs: tuple                     # (hot ids, warm ids) as the worker passed them
    hot: list[int]                  # those naming existing adapters, sorted
    warm: list[int]
    written: tuple | None           # the worker row as stored: (hot, warm, heartbeat_at)
    read_at: datetime               # queue clock
    read_mono: float                # time.monotonic()
    generation: int
    read_at_epoch: float = 0.0
    existing: set[int] = field(default_factory=set)   # adapter ids known to exist
    requested: set[int] = field(default_factory=set)  # ids looked up at read time
    capacity: int = 0               # the worker's engine rows, as its heartbeat recorded them
    # The tenants with a group in the snapshot as ",id,id,": one text parameter costs the
    # claim statement nothing, an array of 100 ids about 0.1 ms.
    known: str = ","
    top: int = 0                    # the highest priority among its groups

    def usable(self, now: datetime, mono: float, ttl: float) -> bool:
        age = (now - self.read_at).total_seconds()
        return (GENERATION[0] == self.generation and 0 <= mono - self.read_mono <= ttl
                and -ttl <= age <= ttl)

    def resolve(self, hot, warm) -> tuple[list[int], list[int]] | None:
        """The worker's hot/warm ids that name existing adapters, sorted, or None when this
        snapshot cannot tell."""
        refs = (tuple(hot or ()), tuple(warm or ()))
        if refs == self.refs:
            return self.hot, self.warm
        out, existing, requested = [], self.existing, self.requested
        for side in refs:
            ids = set()
            for r in side:
                if r in existing:
                    ids.add(r)
                elif r not in requested:
                    return None  # an id this snapshot never saw
            out.append(sorted(ids))
        return out[0], out[1]

    def unseen_filter(self) -> dict:
        """Parameters of the claim statement's check for groups this snapshot cannot show:
        live since shortly before its read, of a tenant it does not know or above its top
        priority (another process's submit; this process's own writes bump GENERATION)."""
        return {"since": self.read_at - timedelta(seconds=UNSEEN_MARGIN_S),
                "known": self.known, "top": self.top}

    def worker_stale(self, hot: list[int], warm: list[int], now: datetime,
                     refresh_s: float) -> bool:
        """Whether the stored worker row needs rewriting (caches changed, heartbeat old)."""
        if self.written is None:
            return True
        w_hot, w_warm, beat = self.written
        return (w_hot != hot or w_warm != warm or beat is None
                or (now - beat).total_seconds() > refresh_s)

    def apply(self, wants: list, total: int, got: dict[tuple, int], groups: list,
              served: list) -> bool:
        """Take in what this worker's claim statement reported. wants: the (group, count)
        pairs it was given, in order, to fill total slots; got maps group key -> jobs
        claimed; groups are (tenant, adapter, priority, queued, oldest epoch) rows of the
        claimed groups as the claim left them and of the wanted tenants' next groups;
        served are (tenant, fair-share counter) rows. Returns False when the snapshot must
        not be used again."""
        if not got:
            return False  # nothing claimed: nothing reported either
        far = self.read_at_epoch + 1e9
        before = 0
        for g, _ in wants:
            if before >= total:
                break  # not reached: the statement stopped pulling rows
            n = got.get(g.key, 0)
            if n == 0:  # reached, and none left (or all leased elsewhere)
                self.groups.pop(g.key, None)
            before += n
        for t, a, p, queued, oldest in groups:
            key = (t, a, p)
            if queued > 0:
                self.groups[key] = Group(t, a, p, queued, far if oldest is None else oldest)
            else:
                self.groups.pop(key, None)
            self.existing.add(a)
        for t, value in served:
            self.served[t] = value
        # Short: other claimers are taking from the groups this snapshot shows (small groups,
        # or a stale snapshot): read a fresh one next time.
        return before >= total


def wanted_groups(plan: Plan) -> list[tuple[Group, int]]:
    """The plan's takes then spares as (group, count), a group split across both merged."""
    out: list[tuple[Group, int]] = []
    for take in plan.takes + plan.spares:
        if out and out[-1][0].key == take.group.key:
            out[-1] = (take.group, out[-1][1] + take.count)
        else:
            out.append((take.group, take.count))
    return out
