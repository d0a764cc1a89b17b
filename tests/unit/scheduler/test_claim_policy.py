"""The pure claim policy: aging, priority, affinity, fair share, spread (no database)."""
from __future__ import annotations

from scheduler.policy import Group, Snapshot, affinity_tier, plan_claim

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


def test_higher_priority_class_first_even_when_cold():
    snap = Snapshot([g(adapter=1, priority=0), g(adapter=2, priority=5)], NOW, free_slots=4,
                    hot={1})
    assert taken(plan_claim(snap)) == [("t1", 2, 4)]


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


def test_base_model_counts_as_hot_and_empty_input_gives_nothing():
    assert affinity_tier(0, Snapshot([], NOW, free_slots=1)) == 0
    assert plan_claim(Snapshot([], NOW, free_slots=32)).takes == []
    assert plan_claim(Snapshot([g()], NOW, free_slots=0)).takes == []
