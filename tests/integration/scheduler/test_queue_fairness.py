"""Fairness against affinity in the database: a flooder on a hot adapter does not keep a small
tenant waiting; affinity is by adapter id (tenant-scoped), never by name; claims requeue
expired leases when beat is down."""
from __future__ import annotations

from collections import OrderedDict

import pytest

from lorry.scheduler import JobSpec, Result

DONE = Result("ok", [1], "stop", 1, 1)


class SimWorker:
    """A GPU worker of `rows` engine rows (registered by a heartbeat, as a worker does when it
    starts), one step at a time: claim the free rows (its GPU slots' adapters reported as
    hot, by id), run each job for its number of steps (2-4, from its prompt), complete the
    finished ones."""

    def __init__(self, queue, clock, rows: int = 8, gpu_slots: int = 4):
        self.queue, self.clock, self.rows, self.gpu_slots = queue, clock, rows, gpu_slots
        self.gpu: OrderedDict[int, bool] = OrderedDict()
        self.running: dict[str, list] = {}  # job id -> [steps left, job]
        self.done: set[str] = set()
        queue.heartbeat("sim", [], [], [], rows)

    def step(self) -> list:
        """One engine step; returns the jobs claimed in it, in claim order."""
        claimed = []
        free = self.rows - len(self.running)
        if free:
            for mb in self.queue.claim("sim", list(self.gpu), [], free):
                if mb.adapter is not None:
                    self.gpu[mb.adapter.id] = True
                    self.gpu.move_to_end(mb.adapter.id)
                for job in mb.jobs:
                    self.running[job.id] = [2 + int(job.prompt.lstrip("ab")) % 3, job]
                    claimed.append(job)
            while len(self.gpu) > self.gpu_slots:
                self.gpu.popitem(last=False)
        finished = []
        for job_id, slot in list(self.running.items()):
            slot[0] -= 1
            if slot[0] == 0:
                finished.append(self.running.pop(job_id)[1])
        self.queue.complete_many([(j.id, j.lease_token, DONE, False) for j in finished])
        self.done |= {j.id for j in finished}
        self.clock.advance(0.05)
        return claimed

    def steps_until_done(self, job_ids: set, limit: int = 1000) -> int:
        for n in range(1, limit + 1):
            self.step()
            if job_ids <= self.done:
                return n
        raise AssertionError(f"{len(job_ids - self.done)} jobs not done after {limit} steps")


@pytest.mark.parametrize("flood_priority", [0, 100])
def test_a_small_tenant_is_served_within_max_num_seqs_of_a_flood_on_a_hot_adapter(
        make_queue, clock, flood_priority):
    """Also when the flooder sets the highest priority a tenant may (it came before fair
    share: the whole flood went first)."""
    queue = make_queue()
    a, _ = queue.create_tenant("flooder")
    b, _ = queue.create_tenant("small")
    # B's adapter is named like A's: it is still B's own, cold adapter.
    queue.register_adapter("style", "/adapters/a/style", tenant_id=a.id)
    queue.register_adapter("style", "/adapters/b/style", tenant_id=b.id)
    flood = {j.id for j in queue.submit(a.id, [JobSpec("style", prompt=f"a{i}",
                                                       priority=flood_priority)
                                               for i in range(500)])}
    worker = SimWorker(queue, clock, rows=8)
    claimed = 0
    while claimed < 100:
        claimed += len(worker.step())
    small = {j.id for j in queue.submit(b.id, [JobSpec("style", prompt=f"b{i}")
                                               for i in range(20)])}
    flood_before, steps = 0, 0  # the flood's jobs claimed before the small tenant's first
    while True:
        steps += 1
        got = worker.step()
        if any(j.id in small for j in got):
            break
        flood_before += len(got)
    assert flood_before <= worker.rows, f"{flood_before} of the flood's jobs went first"
    under_flood = steps + worker.steps_until_done(small)
    assert len(flood - worker.done) > 100  # the flood was still on all along
    worker.steps_until_done(flood)
    again = {j.id for j in queue.submit(b.id, [JobSpec("style", prompt=f"b{i}")
                                               for i in range(20)])}
    idle = worker.steps_until_done(again)
    assert under_flood <= 2 * idle, (under_flood, idle)


def test_affinity_is_by_adapter_id_and_names_are_refused(make_queue):
    queue = make_queue()
    a, _ = queue.create_tenant("a")
    b, _ = queue.create_tenant("b")
    a_style = queue.register_adapter("style", "/adapters/a/style", tenant_id=a.id).id
    b_style = queue.register_adapter("style", "/adapters/b/style", tenant_id=b.id).id
    b_other = queue.register_adapter("other", "/adapters/b/other", tenant_id=b.id).id
    queue.submit(b.id, [JobSpec("style", prompt=str(i)) for i in range(20)])
    queue.submit(b.id, [JobSpec("other", prompt=str(i)) for i in range(20)])
    # A's "style" in the GPU slots says nothing about B's "style": B's warm adapter wins.
    got = queue.claim("w1", [a_style], [b_other], free_slots=8)
    assert [(mb.adapter.id, len(mb.jobs)) for mb in got] == [(b_other, 8)]
    got = queue.claim("w1", [b_style], [b_other], free_slots=8)
    assert [(mb.adapter.id, len(mb.jobs)) for mb in got] == [(b_style, 8)]
    for hot, warm in ((["style"], []), ([], ["other"]), ([True], [])):
        with pytest.raises(TypeError, match="AdapterInfo.id"):
            queue.claim("w1", hot, warm, free_slots=8)
    with pytest.raises(TypeError, match="AdapterInfo.id"):
        queue.heartbeat("w1", [], ["style"], [], 8)


def test_a_claim_requeues_expired_leases_while_beat_is_down(make_queue, clock):
    survivor, doomed = make_queue(), make_queue()
    t, _ = survivor.create_tenant("t")
    assert survivor.claim("survivor", [], [], free_slots=8) == []  # idle: nothing queued
    jobs = {j.id for j in survivor.submit(t.id, [JobSpec(None, prompt=str(i))
                                                 for i in range(3)])}
    held = [j for mb in doomed.claim("doomed", [], [], free_slots=8, lease_seconds=30)
            for j in mb.jobs]
    assert {j.id for j in held} == jobs  # then that worker dies: nothing heartbeats them
    clock.advance(20)
    assert survivor.claim("survivor", [], [], free_slots=8) == []  # leases still valid
    clock.advance(11)  # no reap_expired_leases() call: beat is down
    back = [j for mb in survivor.claim("survivor", [], [], free_slots=8) for j in mb.jobs]
    assert {j.id for j in back} == jobs and all(j.attempts == 2 for j in back)
    assert survivor.last_reap_at() == clock()
    assert not doomed.complete(held[0].id, held[0].lease_token, DONE)


def test_a_tenants_own_priority_holds_when_another_tenant_has_many_priority_groups(
        make_queue):
    """Candidates were each tenant's oldest group plus the 32 highest-priority groups of all
    tenants: a tenant with 40 adapters at priority 100 filled those, and another tenant's
    priority-50 job waited behind its own older priority-0 one."""
    queue = make_queue()
    a, _ = queue.create_tenant("a")
    f, _ = queue.create_tenant("f")
    queue.register_adapter("x", "/adapters/x", tenant_id=a.id)
    for i in range(40):
        queue.register_adapter(f"f{i}", f"/adapters/f{i}", tenant_id=f.id)
    [low] = queue.submit(a.id, [JobSpec("x", prompt="low")])
    queue.submit(f.id, [JobSpec(f"f{i}", prompt="p", priority=100) for i in range(40)
                        for _ in range(2)])
    [high] = queue.submit(a.id, [JobSpec("x", prompt="high", priority=50)])
    a_jobs = []
    for _ in range(8):
        for mb in queue.claim("w", [], [], free_slots=1):
            a_jobs += [j.id for j in mb.jobs if j.id in (low.id, high.id)]
    assert a_jobs == [high.id, low.id]
