"""A result's logprobs are stored by complete and complete_many and read back (SQLite and
PostgreSQL); results without them read back as None; batch output lines carry them in
OpenAI's shape."""
from __future__ import annotations

import json

from lorry.scheduler import JobSpec, Result

LOGPROBS = [{"id": 5, "token": "a\u0000", "logprob": -0.25, "top": [[5, "a\u0000", -0.25]]},
            {"id": 1, "token": "</s>", "logprob": -1.5, "top": []}]
TOP = [{"id": 7, "token": "hé", "logprob": -0.5, "top": [[7, "hé", -0.5], [9, "ho", -1.25]]},
       {"id": 8, "token": "!", "logprob": -2.0, "top": []}]


def test_logprobs_are_stored_with_the_result(queue):
    tenant, _ = queue.create_tenant("acme")
    jobs = queue.submit(tenant.id, [JobSpec(None, prompt=f"p{i}") for i in range(3)])
    claimed = [j for mb in queue.claim("w", [], [], 8) for j in mb.jobs]
    assert len(claimed) == 3
    by_id = {c.id: c for c in claimed}
    first, second, third = (by_id[j.id] for j in jobs)
    assert queue.complete(first.id, first.lease_token,
                          Result("a", [5, 1], "stop", 1, 2, logprobs=LOGPROBS))
    assert queue.complete_many([
        (second.id, second.lease_token, Result("a", [5, 1], "stop", 1, 2, logprobs=LOGPROBS),
         False),
        (third.id, third.lease_token, Result("b", [6], "length", 1, 1), False)]) == \
        {second.id, third.id}
    assert queue.get_job(first.id).result.logprobs == LOGPROBS
    assert queue.get_job(second.id).result.logprobs == LOGPROBS
    assert queue.get_job(third.id).result.logprobs is None


def _output_lines(queue, tenant_id: str, batch_id: str) -> dict[str, dict]:
    info = queue.get_batch(batch_id, tenant_id)
    raw = b"".join(queue.file_content(info.output_file_id, tenant_id))
    return {x["custom_id"]: x for x in map(json.loads, raw.decode("utf-8").splitlines())}


def test_batch_output_lines_carry_logprobs_in_openai_shape(queue):
    tenant, _ = queue.create_tenant("acme")
    batch = queue.create_batch(tenant.id, [
        JobSpec(None, messages=[{"role": "user", "content": "hi"}], custom_id="chat",
                sampling={"logprobs": 1}),
        JobSpec(None, prompt="once", custom_id="text", sampling={"logprobs": 1}),
        JobSpec(None, prompt="plain", custom_id="plain")])
    for job in (j for mb in queue.claim("w", [], [], 8) for j in mb.jobs):
        logprobs = None if job.prompt == "plain" else TOP
        assert queue.complete(job.id, job.lease_token,
                              Result("hé!", [7, 8], "stop", 1, 2, logprobs=logprobs))
    assert queue.finalize_batches() == 1
    lines = _output_lines(queue, tenant.id, batch.id)

    chat = lines["chat"]["response"]["body"]["choices"][0]["logprobs"]
    assert chat == {"refusal": None, "content": [
        {"token": "hé", "logprob": -0.5, "bytes": [104, 195, 169],
         "top_logprobs": [{"token": "hé", "logprob": -0.5, "bytes": [104, 195, 169]},
                          {"token": "ho", "logprob": -1.25, "bytes": [104, 111]}]},
        {"token": "!", "logprob": -2.0, "bytes": [33], "top_logprobs": []}]}
    text = lines["text"]["response"]["body"]["choices"][0]["logprobs"]
    assert text == {"tokens": ["hé", "!"], "token_logprobs": [-0.5, -2.0],
                    "top_logprobs": [{"hé": -0.5, "ho": -1.25}, {"!": -2.0}],
                    "text_offset": [0, 2]}   # the sampled token is always among them
    assert lines["plain"]["response"]["body"]["choices"][0]["logprobs"] is None
