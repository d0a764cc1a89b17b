"""Claims in the database follow the policy: tenant fairness, adapter affinity, aging."""
from __future__ import annotations

import pytest

from lorry.scheduler import JobSpec


def claimed_ids(mbs) -> list:
    return [(mb.adapter.name if mb.adapter else None, j) for mb in mbs for j in mb.jobs]


@pytest.mark.parametrize("weight_a", [1.0, 3.0])
def test_small_tenant_is_served_within_twice_its_share(make_queue, weight_a):
    queue = make_queue()
    a, _ = queue.create_tenant("big", weight=weight_a)
    b, _ = queue.create_tenant("small", weight=1.0)
    for k in range(10):
        queue.register_adapter(f"a{k}", f"/adapters/a{k}")
    queue.submit(a.id, [JobSpec(f"a{k % 10}", prompt=str(k)) for k in range(10_000)])
    queue.submit(b.id, [JobSpec(f"a{k % 2}", prompt=str(k)) for k in range(100)])
    total = b_done = 0
    while b_done < 100:
        jobs = claimed_ids(queue.claim("w1", hot=[], warm=[], free_slots=32))
        assert jobs, "the queue ran dry before tenant B was served"
        total += len(jobs)
        b_done += sum(1 for _, j in jobs if j.tenant_id == b.id)
    # B owns half (weights 1:1) or a quarter (3:1) of the service while both are backlogged.
    bound = 2 * 100 * weight_a + 2 * 32
    assert total <= bound, f"B's 100 jobs needed {total} claims (bound {bound})"


def test_hot_adapter_keeps_the_worker_until_aging_hands_over(make_queue, clock):
    queue = make_queue(aging_seconds=60)
    t, _ = queue.create_tenant("t")
    x, _, z = (queue.register_adapter(n, f"/adapters/{n}").id for n in ("x", "y", "z"))
    queue.submit(t.id, [JobSpec("y", prompt=str(i)) for i in range(10)])
    clock.advance(30)
    queue.submit(t.id, [JobSpec("x", prompt=str(i)) for i in range(200)])
    queue.submit(t.id, [JobSpec("z", prompt=str(i)) for i in range(10)])
    for _ in range(4):  # x is hot: only x, although y waits longer
        names = {n for n, _ in claimed_ids(queue.claim("w1", hot=[x], warm=[z],
                                                      free_slots=8))}
        assert names == {"x"}
    clock.advance(31)  # y's oldest job now waited 61 s > aging bound
    first = claimed_ids(queue.claim("w1", hot=[x], warm=[z], free_slots=8))
    assert [n for n, _ in first] == ["y"] * 8
    # Once nothing is overdue, affinity rules again (z only waited 31 s).
    rest = claimed_ids(queue.claim("w1", hot=[x], warm=[z], free_slots=8))
    assert [n for n, _ in rest][:2] == ["y", "y"] and {n for n, _ in rest[2:]} == {"x"}


def test_warm_before_cold_and_avoid_adapters_hot_elsewhere(make_queue):
    queue = make_queue()
    t, _ = queue.create_tenant("t")
    ids = {}
    for name in ("p", "q", "r"):
        ids[name] = queue.register_adapter(name, f"/adapters/{name}").id
        queue.submit(t.id, [JobSpec(name, prompt=str(i)) for i in range(20)])
    assert {n for n, _ in claimed_ids(queue.claim("w1", [], [ids["q"]], free_slots=4))} == {"q"}
    queue.heartbeat("w2", [], hot=[ids["p"]], warm=[], capacity=8)  # p is hot on a live worker
    names = [n for n, _ in claimed_ids(queue.claim("w3", [], [], free_slots=36))]
    assert sorted(set(names)) == ["q", "r"] and len(names) == 36  # p is left alone
    # When nothing else is left, the adapter hot elsewhere is still served.
    names = [n for n, _ in claimed_ids(queue.claim("w3", [], [], free_slots=40))]
    assert names == ["p"] * 20


def test_priority_class_first(make_queue):
    queue = make_queue()
    t, _ = queue.create_tenant("t")
    x = queue.register_adapter("x", "/adapters/x").id
    queue.submit(t.id, [JobSpec("x", prompt="bulk") for _ in range(20)])
    urgent = queue.submit(t.id, [JobSpec(None, prompt="now", priority=10) for _ in range(3)])
    got = claimed_ids(queue.claim("w1", hot=[x], warm=[], free_slots=3))
    assert {j.id for _, j in got} == {j.id for j in urgent}
