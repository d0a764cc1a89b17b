"""submit_many: several tenants' jobs in one transaction (one COPY on PostgreSQL)."""
from __future__ import annotations

import pytest

from lorry.scheduler import JobSpec, errors


def test_submit_many_queues_each_tenants_jobs_under_that_tenant(queue):
    a, _ = queue.create_tenant("a")
    b, _ = queue.create_tenant("b")
    queue.register_adapter("own", "/adapters/own", tenant_id=a.id)
    queue.register_adapter("shared", "/adapters/shared")
    # 100 jobs: enough for the COPY path on PostgreSQL.
    out = queue.submit_many({
        a.id: [JobSpec("own", prompt=f"a{i}", custom_id=f"c{i}") for i in range(70)],
        b.id: [JobSpec("shared", prompt=f"b{i}", idempotency_key=f"k{i}") for i in range(30)]})
    assert [j.prompt for j in out[a.id]] == [f"a{i}" for i in range(70)]
    assert {j.tenant_id for j in out[b.id]} == {b.id}
    assert queue.get_job(out[a.id][5].id, a.id).custom_id == "c5"
    assert queue.get_job(out[b.id][0].id, a.id) is None  # b's job is not a's
    again = queue.submit(b.id, [JobSpec("shared", prompt="x", idempotency_key="k3")])
    assert again[0].id == out[b.id][3].id
    claimed = [j for mb in queue.claim("w1", hot=[], warm=[], free_slots=200) for j in mb.jobs]
    assert sorted(j.id for j in claimed) == sorted(j.id for v in out.values() for j in v)


@pytest.mark.parametrize("bad", ["adapter", "tenant"])
def test_submit_many_is_all_or_nothing(queue, bad):
    a, _ = queue.create_tenant("a")
    b, _ = queue.create_tenant("b")
    queue.register_adapter("own", "/adapters/own", tenant_id=a.id)
    good = [JobSpec("own", prompt=str(i)) for i in range(80)]
    if bad == "adapter":  # "own" is a's adapter: b may not use it
        request, error = {a.id: good, b.id: [JobSpec("own", prompt="b")]}, errors.UnknownAdapter
    else:
        request, error = {a.id: good, "tenant_nope": [JobSpec(None, prompt="x")]}, \
            errors.UnknownTenant
    with pytest.raises(error, match="own|tenant_nope"):
        queue.submit_many(request)
    assert queue.claim("w1", hot=[], warm=[], free_slots=100) == []
    assert queue.list_jobs(a.id) == []


@pytest.mark.parametrize("spec", [
    JobSpec(None, prompt="a\x00b"),
    JobSpec(None, messages=[{"role": "user", "content": "hi\x00"}]),
    JobSpec(None, prompt="x", sampling={"stop": ["\x00"]}),
    JobSpec(None, prompt="x", custom_id="id\x00")], ids=["prompt", "messages", "sampling",
                                                          "custom_id"])
def test_nul_characters_are_refused_before_anything_is_written(queue, spec):
    t, _ = queue.create_tenant("t")
    good = [JobSpec(None, prompt=str(i)) for i in range(70)]   # a COPY-sized bulk
    with pytest.raises(errors.InvalidJob, match="NUL"):
        queue.submit(t.id, good + [spec])
    assert queue.list_jobs(t.id, limit=10) == []
