"""The worker reports the adapters in its engine by AdapterInfo id, never by name."""
from __future__ import annotations

from lorry.scheduler import JobSpec
from lorry.workers.drain import Drainer


def test_adapters_of_the_same_name_are_reported_as_the_tenant_owned_ids(queue, engine, tiny):
    a, _ = queue.create_tenant("a")
    b, _ = queue.create_tenant("b")
    a_style = queue.register_adapter("style", str(tiny[1]["alpha"]), tenant_id=a.id, rank=8)
    b_style = queue.register_adapter("style", str(tiny[1]["beta"]), tenant_id=b.id, rank=16)
    queue.submit(a.id, [JobSpec("style", prompt="hi", sampling={"max_tokens": 2})])
    drainer = Drainer(queue, engine, "w-ids", max_num_seqs=4, heartbeat_seconds=5.0)
    assert drainer.run().succeeded == 1
    hot, warm = drainer.hot_warm()
    assert a_style.id in hot + warm and b_style.id not in hot + warm
    assert all(type(i) is int for i in hot + warm)
    # The queue takes what it reports.
    queue.submit(b.id, [JobSpec("style", prompt=str(i)) for i in range(4)])
    [mb] = queue.claim("w-ids", hot, warm, free_slots=4)
    assert mb.adapter.id == b_style.id and len(mb.jobs) == 4
