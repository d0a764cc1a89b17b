"""The Python client: typed jobs and batches, waiting, paging, and errors a user can act on."""
from __future__ import annotations

import json

import pytest

from lorry.errors import InvalidRequest, LorryError, NotFound, Unauthorized, WaitTimeout
from lorry.models import Job
from tests.unit.api.conftest import finish_all


def test_submit_wait_get(service, make_client):
    _, queue, *_ = service
    c, _ = make_client("acme")
    job = c.submit("hello", max_tokens=4, temperature=0)
    assert isinstance(job, Job) and job.status == "queued" and not job.done
    with pytest.raises(WaitTimeout, match="still 'queued'"):
        c.wait(job.id, timeout=0.3, poll_interval=0.05)
    finish_all(queue)
    done = c.wait(job.id, timeout=5)
    assert done.status == "succeeded" and done.text == "echo hello"
    assert done.result.usage.total_tokens == 8 and c.get(job.id).done
    assert done.result.usage.prompt_tokens_details.cached_tokens == 2


def test_list_follows_cursor_pages_and_cancel(make_client):
    c, _ = make_client("acme")
    ids = [c.submit(f"p{i}").id for i in range(5)]
    assert sorted(j.id for j in c.list(page_size=2)) == sorted(ids)
    assert c.cancel(ids[0]).status == "cancelled"
    assert [j.id for j in c.list(status="cancelled")] == [ids[0]]


def test_errors_are_typed_with_the_servers_message(service, make_client):
    from fastapi.testclient import TestClient

    from lorry.client import Client

    app, *_ = service
    a, _ = make_client("a")
    b, _ = make_client("b")
    job = a.submit("mine")
    with pytest.raises(NotFound) as e:
        b.get(job.id)
    assert e.value.status == 404 and job.id in e.value.message
    with pytest.raises(NotFound):
        b.cancel(job.id)
    with pytest.raises(InvalidRequest) as e:
        a.submit("x", max_tokens=0)
    assert e.value.status == 422 and "sampling.max_tokens" in e.value.message
    assert (e.value.type, e.value.param) == ("invalid_request_error", "sampling.max_tokens")
    assert e.value.code == "greater_than_equal" and e.value.detail["code"] == e.value.code
    with pytest.raises(InvalidRequest, match="unknown adapter 'ghost'"):
        a.submit("x", adapter="ghost")
    with pytest.raises(TypeError, match="frequency_penalty"):
        a.submit("x", frequency_penalty=1.0)
    with Client("http://testserver", "wrong", http_client=TestClient(app)) as bad:
        with pytest.raises(Unauthorized, match="invalid API key"):
            bad.get(job.id)
    with Client("http://127.0.0.1:9", "k", timeout=2) as down:
        with pytest.raises(LorryError, match="cannot reach") as e:
            down.get(job.id)
        assert e.value.status == 0


def test_batches_from_records_and_path(service, make_client, tmp_path):
    _, queue, *_ = service
    c, _ = make_client("acme")
    records = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "tiny-llama", "messages": [{"role": "user", "content": f"q{i}"}],
                         "max_tokens": 3}} for i in range(3)]
    batch = c.submit_batch(records, metadata={"who": "test"})
    assert batch.request_counts.total == 3 and batch.metadata == {"who": "test"}
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n")
    second = c.submit_batch(path)
    assert second.request_counts.total == 2
    finish_all(queue)
    queue.finalize_batches()
    assert c.wait_batch(batch.id, timeout=5).status == "completed"
    lines = list(c.iter_results(batch.id))
    assert sorted((x.custom_id, x.text) for x in lines) == [
        ("r0", "echo q0"), ("r1", "echo q1"), ("r2", "echo q2")]
    assert list(c.iter_results(batch.id, errors=True)) == []
    with pytest.raises(NotFound):
        list(c.iter_results("batch_nope"))


def test_adapters(make_client, adapter_root):
    c, _ = make_client("acme")
    a = c.add_adapter("alpha", str(adapter_root / "alpha"))
    assert a.rank == 8 and [x.name for x in c.adapters()] == ["alpha"]
    with pytest.raises(InvalidRequest, match="outside the allowed adapter roots"):
        c.add_adapter("etc", "/etc")
    c.delete_adapter("alpha")
    assert c.adapters() == []


def test_quota_error_carries_retry_after(service):
    from fastapi.testclient import TestClient

    from lorry.client import Client
    from lorry.errors import QuotaExceeded

    app, queue, *_ = service
    _, key = queue.create_tenant("full", max_queued=1)
    with Client("http://testserver", key, http_client=TestClient(app)) as c:
        c.submit("fills the quota")
        with pytest.raises(QuotaExceeded) as e:
            c.submit("x")
    assert e.value.status == 429 and e.value.retry_after == 30
    assert e.value.code == "quota_exceeded" and "max_queued" in e.value.message


@pytest.mark.parametrize("key", ["", "   ", "lorry_x\n"])
def test_an_empty_or_unprintable_key_is_refused_at_construction(key):
    """Not a network error at the first call ("cannot reach ...: Illegal header value")."""
    from lorry.client import Client

    with pytest.raises(ValueError, match="api_key must be a tenant's API key"):
        Client("http://127.0.0.1:9", key)


def test_cli_submit_wait_exits_1_when_the_job_did_not_succeed(make_client, monkeypatch):
    """`lorry submit --wait` printed "cancelled: None" and exited 0, unlike `lorry batch
    submit --wait`: a script could not tell."""
    from typer.testing import CliRunner

    import lorry.cli_client as cli_client
    from lorry.cli import app

    c, _ = make_client("acme")
    monkeypatch.setattr(cli_client, "_client", lambda url, key: c)
    wait = c.wait

    def cancel_then_wait(job_id, **kw):  # the job ends cancelled before any worker runs it
        c.cancel(job_id)
        return wait(job_id, timeout=5)

    monkeypatch.setattr(c, "wait", cancel_then_wait)
    result = CliRunner().invoke(app, ["submit", "hi", "--wait", "--key", "k"])
    assert result.exit_code == 1, result.output
    assert "cancelled" in result.output


def test_odd_answers_and_ids_are_client_errors_and_credentials_stay_hidden(make_client):
    """Another server's answer (HTML, a redirect, a JSON of another shape) was a raw
    JSONDecodeError or pydantic traceback; an id like '../../healthz' reached another route;
    'cannot reach' printed the URL's user:password."""
    import httpx

    from lorry.client import Client

    c, _ = make_client("acme")
    for bad in ("", "../../healthz"):
        with pytest.raises(LorryError) as e:
            c.get(bad)
        assert e.value.status in (0, 404), e.value
    answers = {"/v1/jobs/html": httpx.Response(200, text="<html>login</html>"),
               "/v1/jobs/moved": httpx.Response(302, headers={"location": "/elsewhere"}),
               "/v1/jobs/shape": httpx.Response(200, json={"hello": "world"})}
    http = httpx.Client(base_url="http://proxy", transport=httpx.MockTransport(
        lambda request: answers[request.url.path]))
    with Client("http://proxy", "k", http_client=http) as odd:
        for job_id, words in (("html", "no Lorry API object"), ("moved", "was redirected"),
                              ("shape", "no Lorry API object")):
            with pytest.raises(LorryError, match=words):
                odd.get(job_id)
    with Client("http://user:pw-secret@127.0.0.1:9", "k", timeout=2) as down:
        with pytest.raises(LorryError, match="cannot reach http://127.0.0.1:9") as e:
            down.get("job_x")
        assert "pw-secret" not in str(e.value) and "user" not in str(e.value)
