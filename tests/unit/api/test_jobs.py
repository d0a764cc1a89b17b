"""REST jobs: submit, read, list with filters and cursor pages, cancel, auth, refusals."""
from __future__ import annotations

from tests.unit.api.conftest import finish_all


def test_submit_read_and_result(service, tenant_a):
    _, queue, _, nudges = service
    r = tenant_a.post("/v1/jobs", json={"prompt": "hello", "sampling": {"max_tokens": 4,
                                                                         "temperature": 0}})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["adapter"] is None
    assert job["sampling"]["max_tokens"] == 4 and nudges.count == 1
    finish_all(queue)
    done = tenant_a.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded"
    assert done["result"]["text"] == "echo hello"
    assert done["result"]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                       "total_tokens": 8,
                                       "prompt_tokens_details": {"cached_tokens": 2}}


def test_chat_messages_and_idempotency_key(tenant_a):
    body = {"messages": [{"role": "user", "content": "hi"}], "idempotency_key": "k1"}
    r1, r2 = (tenant_a.post("/v1/jobs", json=body) for _ in range(2))
    first, again = r1.json(), r2.json()
    assert first["id"] == again["id"]
    # a repeat answers 200 (nothing new queued), as files and batches do; the first 201
    assert (r1.status_code, r2.status_code) == (201, 200)
    other = tenant_a.post("/v1/jobs", json={**body, "idempotency_key": "k2"})
    assert other.status_code == 201 and other.json()["id"] != first["id"]
    assert first["messages"] == [{"role": "user", "content": "hi"}]


def test_list_pages_and_filters(tenant_a):
    ids = {tenant_a.post("/v1/jobs", json={"prompt": f"p{i}"}).json()["id"] for i in range(5)}
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2, **({"after": cursor} if cursor else {})}
        page = tenant_a.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["data"]]
        pages += 1
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]
    assert sorted(seen) == sorted(ids) and len(seen) == 5 and pages == 3
    assert tenant_a.get("/v1/jobs", params={"status": "succeeded"}).json()["data"] == []
    assert len(tenant_a.get("/v1/jobs", params={"status": "queued"}).json()["data"]) == 5


def test_a_page_of_large_jobs_stops_at_its_byte_bound_and_the_cursor_leads_on(
        service, tenant_a, monkeypatch):
    """A page of 500 jobs with 128,000-character prompts was 72 MB built at once (300 MB of
    the API's memory per request): a page now ends once its jobs pass PAGE_BYTES."""
    from lorry.api.routes import jobs
    from lorry.scheduler import JobSpec

    monkeypatch.setattr(jobs, "PAGE_BYTES", 5000)
    monkeypatch.setattr(jobs, "FETCH_ROWS", 3)
    queue = service[1]
    made = [j.id for j in queue.submit(tenant_a.tenant.id, [
        JobSpec(adapter=None, prompt=f"{i}" + "#" * 1000 + "語" * 330) for i in range(7)])]
    seen, cursor, sizes = [], None, []
    while True:
        r = tenant_a.get("/v1/jobs", params={"limit": 500, **({"after": cursor} if cursor
                                                               else {})})
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        page = r.json()
        sizes.append(len(page["data"]))
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
        assert cursor == seen[-1]
    assert seen == made and max(sizes) == 3 and len(sizes) == 3
    small = tenant_a.get("/v1/jobs", params={"limit": 2}).json()  # limit still holds
    assert [j["id"] for j in small["data"]] == made[:2] and small["has_more"]
    assert small["data"][0]["prompt"].startswith("0#") and small["next_cursor"] == made[1]
    empty = tenant_a.get("/v1/jobs", params={"status": "failed"}).json()
    assert empty == {"object": "list", "data": [], "has_more": False, "next_cursor": None}


def test_cancel_queued_job(tenant_a):
    job = tenant_a.post("/v1/jobs", json={"prompt": "x"}).json()
    r = tenant_a.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_a_running_jobs_cancel_shows_as_pending(service, tenant_a):
    """A running job's cancel answered 200 with status 'running' and nothing saying a cancel
    was on its way."""
    _, queue, *_ = service
    job = tenant_a.post("/v1/jobs", json={"prompt": "x"}).json()
    assert tenant_a.get(f"/v1/jobs/{job['id']}").json()["cancel_requested"] is False
    [claimed] = [j for mb in queue.claim("w", [], [], free_slots=4) for j in mb.jobs]
    r = tenant_a.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["cancel_requested"]) == ("running", True)
    assert tenant_a.get(f"/v1/jobs/{job['id']}").json()["cancel_requested"] is True


def test_missing_or_invalid_key_is_401(service, tenant_a):
    from fastapi.testclient import TestClient

    app, queue, *_ = service
    with TestClient(app) as anon:
        r = anon.post("/v1/jobs", json={"prompt": "x"})
        assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
        r = anon.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"] == {
            "message": "invalid API key", "type": "authentication_error", "param": None,
            "code": "invalid_api_key"}
    assert queue.list_jobs(tenant_a.tenant.id) == []


def test_other_tenants_jobs_are_404(tenant_a, tenant_b):
    job = tenant_a.post("/v1/jobs", json={"prompt": "secret"}).json()
    assert tenant_b.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert tenant_b.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    assert tenant_b.get("/v1/jobs").json()["data"] == []
    assert tenant_a.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"


def _refused(client, body) -> str:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    return f"{error['param']}: {error['message']}"


def test_bad_input_is_422_naming_the_field_and_nothing_is_queued(service, tenant_a):
    _, queue, _, nudges = service
    msg = _refused(tenant_a, {"prompt": "x", "sampling": {"max_tokens": 0}})
    assert "sampling.max_tokens" in msg and "greater than or equal to 1" in msg
    msg = _refused(tenant_a, {"prompt": "x", "sampling": {"temperature": 7.5}})
    assert "temperature" in msg and "7.5" in msg
    msg = _refused(tenant_a, {"prompt": "x", "sampling": {"top_p": 0}})
    assert "top_p" in msg
    assert "colour" in _refused(tenant_a, {"prompt": "x", "colour": "red"})
    assert "exactly one of 'prompt' or 'messages'" in _refused(tenant_a, {"sampling": {}})
    assert "exactly one" in _refused(tenant_a, {"prompt": "x", "messages": [
        {"role": "user", "content": "y"}]})
    assert "role" in _refused(tenant_a, {"messages": [{"role": "wizard", "content": "y"}]})
    assert "NUL characters" in _refused(tenant_a, {"prompt": "a\x00b"})
    assert "NUL" in _refused(tenant_a, {"messages": [{"role": "user", "content": "\x00"}]})
    msg = _refused(tenant_a, {"prompt": "x", "adapter": "nosuch"})
    assert "unknown adapter 'nosuch'" in msg
    assert queue.list_jobs(tenant_a.tenant.id) == [] and nudges.count == 0


def test_another_tenants_adapter_cannot_be_used(tenant_a, tenant_b, adapter_root):
    r = tenant_a.post("/v1/adapters", json={"name": "mine", "source": str(adapter_root / "alpha")})
    assert r.status_code == 201, r.text
    assert tenant_a.post("/v1/jobs", json={"prompt": "x", "adapter": "mine"}).status_code == 201
    assert "unknown adapter 'mine'" in _refused(tenant_b, {"prompt": "x", "adapter": "mine"})


def test_oversized_job_body_is_413(service, tenant_a):
    _, queue, settings, _ = service
    r = tenant_a.post("/v1/jobs", json={"prompt": "x" * (settings.max_line_bytes + 10)})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
    assert queue.list_jobs(tenant_a.tenant.id) == []
