"""The pure claim policy: aging, priority, affinity, fair share, spread (no database)."""
from __future__ import annotations

import random
import zlib

from lorry.scheduler.policy import (
    INTERACTIVE_PRIORITY,
    Group,
    Snapshot,
    affinity_tier,
    plan_claim,
)

NOW = 1_000_000.0


def g(tenant="t1", adapter=1, priority=0, queued=10, age=10.0) -> Group:
    return Group(tenant, adapter, priority, queued, NOW - age)


def taken(plan) -> list[tuple[str, int, int]]:
    return [(t.group.tenant_id, t.group.adapter_id, t.count) for t in plan.takes]


def test_hot_beats_warm_beats_cold_beats_hot_elsewhere():
    groups = [g(adapter=1, age=50), g(adapter=2, age=40), g(adapter=3, age=30), g(adapter=4)]
    snap = Snapshot(groups, NOW, free_slots=40, hot={4}, warm={3}, hot_elsewhere={1})
    assert [a for _, a, _ in taken(plan_claim(snap))] == [4, 3, 2, 1]


def test_fills_free_slots_from_the_best_group_first_and_never_takes_more_than_queued():
    snap = Snapshot([g(adapter=1, queued=5), g(adapter=2, queued=100)], NOW, free_slots=8,
                    hot={1})
    assert taken(plan_claim(snap)) == [("t1", 1, 5), ("t1", 2, 3)]


def test_a_tenants_higher_priority_first_even_when_cold():
    snap = Snapshot([g(adapter=1, priority=0), g(adapter=2, priority=5)], NOW, free_slots=4,
                    hot={1})
    assert taken(plan_claim(snap)) == [("t1", 2, 4)]


def test_a_tenants_priority_does_not_pass_another_tenants_fair_share():
    """Priority came before fair share: a tenant that set priority 1 on a flood of jobs was
    served all of it before another tenant's priority-0 jobs (up to the aging bound)."""
    flood = g(tenant="flooder", adapter=1, priority=100, queued=5000, age=5)
    small = g(tenant="small", adapter=2, priority=0, queued=20, age=1)
    snap = Snapshot([flood, small], NOW, free_slots=32, served={"flooder": 500.0},
                    capacity=32)
    assert ("small", 2, 20) in taken(plan_claim(snap))


def test_interactive_jobs_come_before_any_tenants_bulk_work():
    bulk = g(tenant="a", adapter=1, priority=100, queued=50, age=100)
    chat = g(tenant="b", adapter=2, priority=INTERACTIVE_PRIORITY, queued=2, age=1)
    snap = Snapshot([bulk, chat], NOW, free_slots=4, served={"b": 1000.0}, hot={1})
    assert taken(plan_claim(snap)) == [("b", 2, 2), ("a", 1, 2)]


def test_overdue_group_beats_priority_and_affinity_oldest_first():
    groups = [g(adapter=1, priority=9, age=1), g(adapter=2, age=400), g(adapter=3, age=900)]
    snap = Snapshot(groups, NOW, free_slots=20, hot={1}, aging_seconds=300)
    assert [a for _, a, _ in taken(plan_claim(snap))] == [3, 2]


def test_jobs_not_yet_eligible_are_skipped():
    snap = Snapshot([g(adapter=1, age=-30)], NOW, free_slots=4)
    assert plan_claim(snap).takes == []


def test_fair_share_serves_the_tenant_with_less_service():
    groups = [g("a", 1, queued=1000), g("b", 2, queued=1000)]
    snap = Snapshot(groups, NOW, free_slots=32, served={"a": 64.0, "b": 0.0})
    assert taken(plan_claim(snap)) == [("b", 2, 32)]


def test_weights_scale_the_share_and_idle_tenants_bank_no_credit():
    # b's counter is far behind (it was idle): it starts at the floor of the active tenants.
    groups = [g("a", 1, queued=1000), g("b", 2, queued=1000)]
    snap = Snapshot(groups, NOW, free_slots=8, served={"a": 100.0, "b": 0.0},
                    weights={"a": 1.0, "b": 1.0})
    plan = plan_claim(snap)
    assert plan.floor == 92.0  # a's last start: b may lead by at most one claim of 8
    assert taken(plan) == [("b", 2, 8)]
    # With weight 4, tenant a is charged 1/4 per job: over many claims it gets ~4x the jobs.
    served, counts = {"a": 0.0, "b": 0.0}, {"a": 0, "b": 0}
    for _ in range(50):
        plan = plan_claim(Snapshot(groups, NOW, free_slots=8, served=dict(served),
                                   weights={"a": 4.0, "b": 1.0}))
        for t in plan.takes:
            tenant = t.group.tenant_id
            counts[tenant] += t.count
            served[tenant] = max(served[tenant], plan.floor) + t.count / (4.0 if tenant == "a"
                                                                          else 1.0)
    assert 3.0 <= counts["a"] / counts["b"] <= 5.0


def charge(plan, served: dict, weights: dict) -> None:
    """What the claim statement does with a plan: served = max(served, floor) + jobs/weight."""
    per_tenant: dict = {}
    for take in plan.takes:
        per_tenant[take.group.tenant_id] = per_tenant.get(take.group.tenant_id, 0) + take.count
    for t, n in per_tenant.items():
        served[t] = max(served.get(t, 0.0), plan.floor) + n / weights.get(t, 1.0)


def test_a_small_tenant_behind_a_flood_on_a_hot_adapter_is_served_at_the_next_claim():
    # A has served 1,000 jobs of its 5,000 from the worker's hot adapter 1; B then queues 20
    # on its own adapter 2, which is cold here and even hot on another worker.
    flood = g("a", 1, queued=4000, age=100)
    small = g("b", 2, queued=20, age=1)
    for served in ({"a": 1000.0}, {"a": 1000.0, "b": 0.0}, {"a": 1000.0, "b": 990.0}):
        snap = Snapshot([flood, small], NOW, free_slots=8, hot={1}, hot_elsewhere={2},
                        served=dict(served))
        assert taken(plan_claim(snap)) == [("b", 2, 8)], served


def test_under_a_flood_the_small_tenant_gets_half_the_claims_until_it_is_done():
    # One worker, claims of 8: the small tenant's 20 jobs need 3 claims on an idle worker;
    # behind the flood (equal weights) they take at most twice that many, and the flooder
    # gets no more than one claim (8 jobs, max_num_seqs) before the small tenant's first.
    left = {"a": 4000, "b": 20}
    served = {"a": 1000.0}
    claims, flood_before_first = 0, None
    while left["b"]:
        groups = [g("a", 1, queued=left["a"], age=100), g("b", 2, queued=left["b"], age=1)]
        plan = plan_claim(Snapshot([x for x in groups if x.queued], NOW, free_slots=8,
                                   hot={1}, served=dict(served)))
        charge(plan, served, {})
        claims += 1
        for t, _, n in taken(plan):
            left[t] -= n
            if t == "b" and flood_before_first is None:
                flood_before_first = 8 * (claims - 1)
    assert flood_before_first == 0
    assert claims <= 2 * 3


def test_a_returning_tenant_gets_at_most_one_engines_rows_ahead():
    # B was idle while A was served 10,000 jobs; it comes back with 1,000 jobs. On a worker
    # of 64 rows claiming 8 at a time, B gets the next 64 jobs (no more: it banked nothing
    # while idle), then the two alternate although only A's adapter is hot.
    served = {"a": 10_000.0, "b": 0.0}
    sequence: list[str] = []
    for _ in range(40):
        groups = [g("a", 1, queued=10_000), g("b", 2, queued=1000)]
        plan = plan_claim(Snapshot(groups, NOW, free_slots=8, hot={1}, served=dict(served),
                                   capacity=64))
        charge(plan, served, {})
        sequence += [t for t, _, n in taken(plan) for _ in range(n)]
    assert sequence[:64] == ["b"] * 64 and sequence[64] == "a"
    rest = sequence[64:]
    assert abs(rest.count("a") - rest.count("b")) <= 8


def test_weights_hold_whatever_the_affinity():
    # A (weight 3) on the worker's hot adapter, B (weight 1) cold, both backlogged: A gets
    # about three jobs for each of B's, B (weight 3) cold against A (weight 1) hot as well.
    for weights, ratio in (({"a": 3.0, "b": 1.0}, 3.0), ({"a": 1.0, "b": 3.0}, 1 / 3),
                           ({"a": 1.0, "b": 1.0}, 1.0)):
        served: dict = {}
        counts = {"a": 0, "b": 0}
        groups = [g("a", 1, queued=100_000), g("b", 2, queued=100_000)]
        for _ in range(200):
            plan = plan_claim(Snapshot(groups, NOW, free_slots=8, hot={1},
                                       served=dict(served), weights=weights))
            charge(plan, served, weights)
            for t, _, n in taken(plan):
                counts[t] += n
        assert abs(counts["a"] / counts["b"] / ratio - 1) < 0.1, (weights, counts)


def test_affinity_orders_groups_only_within_a_tenants_share():
    # B is a full claim behind A: its cold group goes before A's hot one. Equally due, A's
    # hot group goes first, then the warm ones, then cold ones of either tenant.
    groups = [g("a", 1, queued=100), g("a", 3, queued=100), g("b", 2, queued=100),
              g("b", 4, queued=100)]
    behind = Snapshot(groups, NOW, free_slots=8, hot={1}, warm={3},
                      served={"a": 8.0, "b": 0.0})
    assert {t for t, _, _ in taken(plan_claim(behind))} == {"b"}
    due = Snapshot(groups, NOW, free_slots=8, hot={1}, warm={4}, served={"a": 0.0, "b": 0.0})
    assert taken(plan_claim(due)) == [("a", 1, 8)]
    due.hot = set()
    assert taken(plan_claim(due)) == [("b", 4, 8)]  # the warm one, although B's


def test_the_same_adapter_name_in_two_tenants_is_two_adapters():
    # Each tenant owns an adapter named "style": ids 11 (A's) and 12 (B's). The worker has
    # A's in a GPU slot; B's is cold there, and "hot on another worker" is by id as well.
    a_style, b_style = 11, 12
    groups = [g("b", b_style, queued=50), g("b", 5, queued=50)]
    snap = Snapshot(groups, NOW, free_slots=8, hot={a_style}, warm={5})
    assert affinity_tier(b_style, snap) == 2 and affinity_tier(a_style, snap) == 0
    assert taken(plan_claim(snap)) == [("b", 5, 8)]  # B's warm adapter, not its "style"
    snap = Snapshot(groups, NOW, free_slots=8, hot_elsewhere={a_style}, warm={b_style})
    assert taken(plan_claim(snap)) == [("b", b_style, 8)]


def test_max_adapters_caps_distinct_adapters_per_claim():
    groups = [g(adapter=a, queued=2) for a in range(1, 6)]
    plan = plan_claim(Snapshot(groups, NOW, free_slots=10, max_adapters=2))
    assert len({t.group.adapter_id for t in plan.takes}) == 2
    assert sum(t.count for t in plan.takes) == 4


def test_salt_spreads_workers_over_equally_good_groups():
    groups = [g(adapter=a, queued=100) for a in range(1, 41)]
    firsts = {plan_claim(Snapshot(groups, NOW, free_slots=8, salt=f"w{i}")).takes[0].group
              .adapter_id for i in range(8)}
    assert len(firsts) >= 4


def test_tenants_within_a_claim_per_live_worker_are_equally_due():
    # Tenant a is one claim (32 jobs) ahead of the others. Alone, a worker serves the others
    # first; with 4 live workers the quantum is 4 claims, so the workers spread over all.
    groups = [g(t, a, queued=100) for a, t in enumerate("abcdefgh", start=1)]
    served = {t: 0.0 for t in "abcdefgh"} | {"a": 32.0}
    alone = {plan_claim(Snapshot(groups, NOW, free_slots=32, served=served, salt=f"w{i}"))
             .takes[0].group.tenant_id for i in range(16)}
    assert "a" not in alone
    shared = {plan_claim(Snapshot(groups, NOW, free_slots=32, served=served, salt=f"w{i}",
                                  workers=4)).takes[0].group.tenant_id for i in range(16)}
    assert "a" in shared and len(shared) >= 4


def test_base_model_counts_as_hot_and_empty_input_gives_nothing():
    assert affinity_tier(0, Snapshot([], NOW, free_slots=1)) == 0
    assert plan_claim(Snapshot([], NOW, free_slots=32)).takes == []
    assert plan_claim(Snapshot([g()], NOW, free_slots=0)).takes == []


def reference_plan(snap: Snapshot, budget: int | None = None) -> list[tuple]:
    """The policy written the plain way (re-rank every candidate after each take), for up
    to budget jobs (default: the free slots)."""
    left = {g.key: g.queued for g in snap.groups if g.queued > 0 and g.oldest <= snap.now}
    groups = {g.key: g for g in snap.groups if g.key in left}
    if not left or snap.free_slots <= 0:
        return []
    quantum = float(snap.free_slots * snap.workers)
    weight = {t: max(snap.weights.get(t, 1.0), 1e-9) for t, _, _ in left}
    served = {t: snap.served.get(t, 0.0) for t in weight}
    head = float(max(snap.free_slots, snap.capacity) * snap.workers)
    floor = max(min(served.values()), max(v - head / weight[t] for t, v in served.items()))
    virtual = {t: max(v, floor) for t, v in served.items()}

    def order(g):
        if g.oldest <= snap.now - snap.aging_seconds:
            return (0, g.oldest, g.key)
        spread = zlib.crc32(f"{snap.salt}:{g.tenant_id}:{g.adapter_id}".encode())
        return (1, g.priority < INTERACTIVE_PRIORITY, int(virtual[g.tenant_id] // quantum),
                -g.priority, affinity_tier(g.adapter_id, snap), spread, g.key)

    out, adapters, remaining = [], set(), snap.free_slots if budget is None else budget
    while remaining > 0 and left:
        cands = [groups[k] for k in left]
        if snap.max_adapters is not None and len(adapters) >= snap.max_adapters:
            cands = [c for c in cands if c.adapter_id in adapters]
            if not cands:
                break
        best = min(cands, key=order)
        n = min(left[best.key], remaining)
        out.append((best.key, n))
        adapters.add(best.adapter_id)
        remaining -= n
        left[best.key] -= n
        if not left[best.key]:
            del left[best.key]
        virtual[best.tenant_id] += n / weight[best.tenant_id]
    return out


def test_plan_equals_the_plain_reference_on_random_snapshots():
    rng = random.Random(7)
    for case in range(400):
        tenants = [f"t{i}" for i in range(rng.randint(1, 6))]
        priorities = [0, 0, 0, 5, -3, INTERACTIVE_PRIORITY]
        keys = {(rng.choice(tenants), rng.randint(0, 8), rng.choice(priorities))
                for _ in range(rng.randint(0, 25))}  # distinct, as in the database
        groups = [Group(t, a, p, rng.randint(0, 40), NOW - rng.uniform(-20, 600))
                  for t, a, p in sorted(keys)]
        snap = Snapshot(
            groups, NOW, free_slots=rng.choice([1, 7, 32, 100]),
            hot=set(rng.sample(range(9), 2)), warm=set(rng.sample(range(9), 2)),
            hot_elsewhere=set(rng.sample(range(9), 2)),
            weights={t: rng.choice([1.0, 2.0, 0.5]) for t in tenants},
            served={t: rng.uniform(0, 200) for t in tenants}, aging_seconds=300,
            salt=f"w{case % 3}", max_adapters=rng.choice([None, 1, 2]),
            workers=rng.choice([1, 1, 4]), capacity=rng.choice([0, 8, 64]))
        got = [(t.group.key, t.count) for t in plan_claim(snap).takes]
        assert got == reference_plan(snap), f"case {case}"
        # With spares: the same order continued, the free slots filled by the takes first.
        spare = rng.choice([0, 5, 32])
        plan = plan_claim(snap, spare=spare)
        both: list = []
        for t in plan.takes + plan.spares:  # a group split across takes and spares: merge
            if both and both[-1][0] == t.group.key:
                both[-1] = (t.group.key, both[-1][1] + t.count)
            else:
                both.append((t.group.key, t.count))
        want = reference_plan(snap, snap.free_slots + spare)
        assert both == want, f"case {case}"
        assert sum(t.count for t in plan.takes) == min(snap.free_slots,
                                                       sum(n for _, n in want))
        assert sum(n for _, n in both) == sum(n for _, n in want)
