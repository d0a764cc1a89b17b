"""OpenAI Batch JSONL over REST: upload (raw and multipart), per-line errors, limits, output."""
from __future__ import annotations

import json

import pytest

from tests.unit.api.conftest import finish_all


def chat(cid, model="tiny-llama", content="hi", **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": content}], **body}}


def completion(cid, model="tiny-llama", prompt="once upon", **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": prompt, **body}}


def jsonl(*items) -> bytes:
    return b"".join((i if isinstance(i, bytes) else json.dumps(i).encode()) + b"\n"
                    for i in items)


def upload(client, content: bytes, **params):
    return client.post("/v1/batches", content=content, params=params,
                       headers={"Content-Type": "application/jsonl"})


def test_batch_with_bad_lines_keeps_good_ones_and_reports_each(service, tenant_a, adapter_root):
    _, queue, _, nudges = service
    tenant_a.post("/v1/adapters", json={"name": "alpha", "source": str(adapter_root / "alpha")})
    content = jsonl(chat("a", max_tokens=5, temperature=0), completion("b", model="alpha"),
                    b"{not json", chat("d", colour="red"), chat("e", model="nosuch"),
                    completion("f", max_tokens=0))
    r = upload(tenant_a, content, metadata=json.dumps({"run": "nightly"}))
    assert r.status_code == 201, r.text
    batch = r.json()
    assert batch["object"] == "batch" and batch["status"] == "in_progress"
    assert batch["request_counts"] == {"total": 6, "completed": 0, "failed": 4}
    assert batch["metadata"] == {"run": "nightly"}
    errors = {e["line"]: e for e in batch["errors"]["data"]}
    assert sorted(errors) == [3, 4, 5, 6]
    assert {n: e["custom_id"] for n, e in errors.items()} == {3: None, 4: "d", 5: "e", 6: "f"}
    assert tenant_a.get(f"/v1/batches/{batch['id']}").json()["errors"] == batch["errors"]
    assert errors[3]["code"] == "invalid_json"
    assert "colour" in errors[4]["message"]
    assert "unknown model 'nosuch'" in errors[5]["message"]
    assert "max_tokens" in errors[6]["message"]
    jobs = queue.list_jobs(tenant_a.tenant.id, batch_id=batch["id"])
    assert sorted(j.custom_id for j in jobs) == ["a", "b"]
    assert {j.custom_id: j.adapter for j in jobs} == {"a": None, "b": "alpha"}
    assert {j.custom_id: j.sampling for j in jobs}["a"] == {"max_tokens": 5, "temperature": 0.0}
    assert nudges.count == 1


def test_output_and_error_files_use_openai_shapes(service, tenant_a):
    _, queue, *_ = service
    batch = upload(tenant_a, jsonl(chat("c1", content="one"), completion("t1", prompt="two"),
                                   completion("bad", prompt="FAIL"))).json()
    finish_all(queue)
    queue.finalize_batches()
    got = tenant_a.get(f"/v1/batches/{batch['id']}").json()
    assert got["status"] == "completed"
    assert got["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    out = [json.loads(x) for x in
           tenant_a.get(f"/v1/batches/{batch['id']}/output").text.splitlines()]
    by_id = {x["custom_id"]: x for x in out}
    assert sorted(by_id) == ["c1", "t1"]
    chat_body = by_id["c1"]["response"]["body"]
    assert by_id["c1"]["response"]["status_code"] == 200 and by_id["c1"]["error"] is None
    assert chat_body["object"] == "chat.completion"
    assert chat_body["choices"][0]["message"] == {"role": "assistant", "content": "echo one"}
    assert chat_body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                                  "prompt_tokens_details": {"cached_tokens": 2}}
    text_body = by_id["t1"]["response"]["body"]
    assert text_body["object"] == "text_completion"
    assert text_body["choices"][0]["text"] == "echo two"
    errs = [json.loads(x) for x in
            tenant_a.get(f"/v1/batches/{batch['id']}/errors").text.splitlines()]
    assert [(e["custom_id"], e["response"], e["error"]["message"]) for e in errs] == [
        ("bad", None, "boom")]


def test_multipart_upload(tenant_a):
    r = tenant_a.post("/v1/batches", files={"file": ("in.jsonl", jsonl(chat("m1"), chat("m2")),
                                                     "application/jsonl")})
    assert r.status_code == 201, r.text
    assert r.json()["request_counts"]["total"] == 2


def test_duplicate_custom_id_refuses_the_whole_batch(service, tenant_a):
    _, queue, *_ = service
    r = upload(tenant_a, jsonl(chat("x"), chat("y"), chat("x")))
    assert r.status_code == 400
    [dup] = r.json()["error"]["lines"]
    assert r.json()["error"]["code"] == "duplicate_custom_id"
    assert dup["line"] == 3 and "custom_id 'x' already used on line 1" in dup["message"]
    assert queue.list_jobs(tenant_a.tenant.id) == []


def test_all_bad_or_empty_is_400(service, tenant_a):
    _, queue, *_ = service
    r = upload(tenant_a, jsonl(b"[1, 2]", chat("a", url_typo=1)))
    assert r.status_code == 400 and [e["line"] for e in r.json()["error"]["lines"]] == [1, 2]
    r = upload(tenant_a, b"\n\n")
    assert r.status_code == 400 and "no request lines" in r.json()["error"]["message"]
    assert queue.list_jobs(tenant_a.tenant.id) == []


def test_limits_are_413_and_nothing_is_queued(service, tenant_a):
    _, queue, settings, _ = service
    many = jsonl(*[chat(f"c{i}") for i in range(settings.max_batch_lines + 1)])
    r = upload(tenant_a, many)
    assert r.status_code == 413 and "50 lines" in r.json()["error"]["message"]
    r = upload(tenant_a, jsonl(chat("long", content="x" * 5000)))
    assert r.status_code == 413 and "line 1" in r.json()["error"]["message"]
    r = upload(tenant_a, b"x" * (settings.max_body_bytes + 1))
    assert r.status_code == 413
    assert queue.list_jobs(tenant_a.tenant.id) == []


def test_other_tenant_cannot_see_or_cancel_a_batch(tenant_a, tenant_b):
    batch = upload(tenant_a, jsonl(chat("a"))).json()
    for path in ("", "/output", "/errors"):
        assert tenant_b.get(f"/v1/batches/{batch['id']}{path}").status_code == 404
    assert tenant_b.post(f"/v1/batches/{batch['id']}/cancel").status_code == 404
    assert tenant_a.get(f"/v1/batches/{batch['id']}").json()["status"] != "cancelled"
    r = tenant_a.post(f"/v1/batches/{batch['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
    assert tenant_a.get("/v1/jobs", params={"status": "cancelled"}).json()["data"][0][
        "custom_id"] == "a"


def test_a_chat_line_without_max_tokens_may_use_the_context(service, tenant_a):
    """OpenAI's (and vLLM's) chat requests that name no max_tokens answer as long as the
    context allows: they ended after the engine's default of 16 tokens (finish reason
    "length"). Text completions keep OpenAI's default of 16; a named value is kept."""
    _, queue, settings, _ = service
    r = upload(tenant_a, jsonl(chat("open"), chat("five", max_tokens=5),
                               chat("mct", max_completion_tokens=7),
                               completion("text", prompt="once")))
    assert r.status_code == 201, r.text
    sampling = {j.custom_id: j.sampling for j in queue.list_jobs(tenant_a.tenant.id)}
    assert sampling == {"open": {"max_tokens": settings.max_model_len},
                        "five": {"max_tokens": 5}, "mct": {"max_tokens": 7}, "text": {}}


@pytest.mark.parametrize("refused", [0, 1])
def test_a_custom_id_repeated_on_an_invalid_line_refuses_the_whole_batch(service, tenant_a,
                                                                         refused):
    """An invalid line keeps its custom_id in the error file: repeated on a good line, the
    output file and the error file both had it. As any repeat, the batch is refused."""
    lines = [chat("a"), chat("a")]
    lines[refused] = chat("a", temperature=5)
    r = upload(tenant_a, jsonl(*lines))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "duplicate_custom_id" and err["param"] == "custom_id"
    assert "custom_id 'a' already used on line 1" in err["message"]
    assert service[1].list_jobs(tenant_a.tenant.id) == []


@pytest.mark.parametrize("when", ["before the first chunk", "after the first chunk"])
def test_an_input_file_deleted_while_its_batch_is_created_makes_no_batch(
        service, tenant_a, monkeypatch, when):
    """A DELETE /v1/files/{id} racing a batch create from that file: 404, nothing queued (a
    batch was created of the chunks read before the delete, the rest of the lines lost, or
    the create answered 400 "no request lines")."""
    from lorry.scheduler import files

    _, queue, *_ = service
    rechunk = files._rechunk
    monkeypatch.setattr(files, "_rechunk", lambda pieces: rechunk(pieces, 1024))  # 1 KiB rows
    content = jsonl(*[completion(f"r{i}", prompt=f"line {i} " + "x" * 60) for i in range(40)])
    up = tenant_a.post("/v1/files", files={"file": ("in.jsonl", content)},
                       data={"purpose": "batch"})
    assert up.status_code == 201, up.text
    file_id = up.json()["id"]
    read = queue.file_content

    def deleted_meanwhile(fid, tenant_id):
        if when == "before the first chunk":
            assert queue.delete_file(fid, tenant_id)
        for i, chunk in enumerate(read(fid, tenant_id)):
            yield chunk
            if i == 0:
                assert queue.delete_file(fid, tenant_id)  # another API process's DELETE

    monkeypatch.setattr(queue, "file_content", deleted_meanwhile)
    r = tenant_a.post("/v1/batches", json={"input_file_id": file_id,
                                           "endpoint": "/v1/completions",
                                           "completion_window": "24h"})
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert err["code"] == "file_not_found" and err["param"] == "input_file_id"
    assert "deleted while it was read" in err["message"] and file_id in err["message"]
    assert tenant_a.get("/v1/batches").json()["data"] == []
    assert queue.list_jobs(tenant_a.tenant.id) == []


def test_a_slow_nudge_does_not_stall_other_requests(service, tenant_a):
    """A batch create woke the workers on the event loop: with Redis not answering (stopped,
    not down), every request of the API process waited for it (/healthz 2 s in an audit)."""
    import threading

    app = service[0]
    nudged, answered, waited = threading.Event(), threading.Event(), []

    def slow_nudge():          # a Redis that does not answer until /healthz has been
        nudged.set()
        waited.append(answered.wait(10))
        return False

    app.state.nudger = slow_nudge
    created = {}
    t = threading.Thread(target=lambda: created.setdefault("r", upload(
        tenant_a, jsonl(chat("a")))))
    t.start()
    assert nudged.wait(10)
    assert tenant_a.get("/healthz").status_code == 200   # while the nudge still waits
    answered.set()
    t.join()
    assert waited == [True]    # on the event loop, /healthz waited for the nudge's 10 s
    assert created["r"].status_code == 201
