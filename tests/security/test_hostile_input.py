"""Hostile input a probe found giving 500s (and, for a stop string, a queued job behind the
500 that then broke the tenant's listing): NaN/Infinity, lone UTF-16 surrogates, deep JSON.
Each is a 4xx in the one error shape, and nothing is written."""
from __future__ import annotations

import json

import pytest

from tests.security.conftest import client, counts

JSON = {"Content-Type": "application/json"}
SHAPE = {"message", "type", "param", "code"}


def refused_raw(service, c, path: str, raw: bytes, status: int | None = None, **kw) -> dict:
    """POST raw bytes; assert the status (by default 422 on Lorry's routes, 400 on OpenAI's),
    the error shape, and that no row changed."""
    if status is None:
        status = 422 if path.startswith(("/v1/jobs", "/v1/adapters")) else 400
    url = service[3]
    before = counts(url)
    r = c.post(path, content=raw, headers=kw.pop("headers", JSON), **kw)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and SHAPE <= set(body["error"]), body
    assert counts(url) == before
    return body["error"]


@pytest.fixture
def roomy(service, alice):
    """Alice on an app of the same queue whose size limits let a 100,000-level document
    through (so that the depth check, not the size limit, is what refuses it)."""
    from lorry.api.app import create_app

    app, queue, settings, url = service
    big = settings.model_copy(update={"max_line_bytes": 1 << 20, "max_body_bytes": 4 << 20})
    with client(create_app(big, queue=queue, nudger=None, redis_client=None), alice.key) as c:
        c.tenant = alice.tenant
        yield c


def line(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": "base", "prompt": "hi", "max_tokens": 2, **body}}


@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "x", "sampling": {"temperature": NaN}}', None),
    (b'{"prompt": "x", "sampling": {"temperature": Infinity}}', None),
    (b'{"prompt": "x", "sampling": {"top_p": -Infinity}}', None),
    (b'{"prompt": "x", "sampling": {"temperature": 1e999}}', "sampling.temperature"),
    (b'{"prompt": "x", "sampling": {"top_p": 1e999}}', "sampling.top_p"),
    (b'{"prompt": "x", "deadline_seconds": 1e999}', "deadline_seconds")])
def test_non_finite_numbers_are_422(service, alice, raw, param):
    err = refused_raw(service, alice, "/v1/jobs", raw)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert "finite" in err["message"], err


@pytest.mark.parametrize("raw, code", [
    (b'{"model": "base", "prompt": "x", "temperature": NaN}', "invalid_json"),
    (b'{"model": "base", "prompt": "' + b"[" * 10 + b'", "user": ' + b"[" * 200 + b"]" * 200
     + b"}", "json_too_deep")])
def test_bodies_refused_before_parsing_are_400_on_openai_routes(service, alice, raw, code):
    """The body guard answered 422 on every route, the OpenAI ones too (a review)."""
    err = refused_raw(service, alice, "/v1/completions", raw)      # checks the 400
    assert err["code"] == code, err


@pytest.mark.parametrize("raw, param, code", [
    (b'{"prompt": "x", "sampling": {"temperature": "NaN"}}', "sampling.temperature",
     "float_type"),
    (b'{"prompt": "x", "sampling": {"max_tokens": true}}', "sampling.max_tokens", "int_type"),
    (b'{"prompt": "x", "sampling": {"max_tokens": "5"}}', "sampling.max_tokens", "int_type"),
    (b'{"prompt": "x", "sampling": {"temperature": false}}', "sampling.temperature",
     "float_type"),
    (b'{"prompt": "x", "priority": "1"}', "priority", "int_type"),
    (b'{"prompt": "x", "sampling": {"ignore_eos": 1}}', "sampling.ignore_eos", "bool_type")])
def test_numbers_and_booleans_of_another_json_type_are_422(service, alice, raw, param, code):
    """true is no 1 and "5" no 5 (before, both were quietly converted); an int is a float."""
    err = refused_raw(service, alice, "/v1/jobs", raw)
    assert (err["param"], err["code"]) == (param, code), err


def test_an_int_is_still_a_float(alice):
    r = alice.post("/v1/jobs", json={"prompt": "x", "sampling": {"temperature": 1, "top_p": 1}})
    assert r.status_code == 201, r.text
    assert r.json()["sampling"]["temperature"] == 1.0


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a\ud800b"}, "prompt"),
    ({"messages": [{"role": "user", "content": "hi \udfff"}]}, "messages[0].content"),
    ({"prompt": "x", "sampling": {"stop": "\ud800"}}, "sampling.stop"),
    ({"prompt": "x", "sampling": {"stop": ["ok", "\udc00"]}}, "sampling.stop[1]"),
    ({"prompt": "x", "idempotency_key": "key-\ud800"}, "idempotency_key"),
    ({"prompt": "x", "sampling": {"\ud800": 1}}, None)])
def test_lone_surrogates_are_422_and_the_listing_stays_200(service, alice, body, param):
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as "\ud800"
    assert b"\\ud" in raw
    err = refused_raw(service, alice, "/v1/jobs", raw)
    assert err["code"] == "invalid_text" and "surrogate" in err["message"]
    if param is not None:
        assert err["param"] == param
    # the tenant's listing (which broke on such a row) answers, and holds no such job
    r = alice.get("/v1/jobs")
    assert r.status_code == 200 and r.json()["data"] == []


def test_surrogate_as_raw_bytes_is_422(service, alice):
    # UTF-8-encoded surrogates are not UTF-8: refused as such, not decoded into the prompt
    raw = '{"prompt": "a\ud800"}'.encode("utf-8", "surrogatepass")
    err = refused_raw(service, alice, "/v1/jobs", raw)
    assert err["code"] == "invalid_json" and "UTF-8" in err["message"]


def test_paired_surrogates_are_text_and_round_trip(service, alice):
    # an emoji escaped as a surrogate pair (what json.dumps writes) is valid and kept
    raw = json.dumps({"prompt": "smile \U0001F600", "sampling": {"stop": ["\U0001F600"]},
                      "idempotency_key": "k-\U0001F600"}).encode()
    r = alice.post("/v1/jobs", content=raw, headers=JSON)
    assert r.status_code == 201, r.text
    job = alice.get(f"/v1/jobs/{r.json()['id']}").json()
    assert job["prompt"] == "smile \U0001F600" and job["sampling"]["stop"] == ["\U0001F600"]
    assert [j["id"] for j in alice.get("/v1/jobs").json()["data"]] == [job["id"]]


def test_deep_json_is_refused_before_parsing(service, alice, roomy):
    err = refused_raw(service, roomy, "/v1/jobs", b"[" * 100_000 + b"]" * 100_000)
    assert err["code"] == "json_too_deep" and "32" in err["message"]
    deep = b'{"prompt": "x", "sampling": ' + b'{"a": ' * 40 + b"1" + b"}" * 41
    assert refused_raw(service, alice, "/v1/jobs", deep)["code"] == "json_too_deep"
    # brackets inside strings are text, not nesting
    r = alice.post("/v1/jobs", json={"prompt": "[{" * 50, "sampling": {"stop": ["]]" * 40]}})
    assert r.status_code == 201, r.text


def test_deeply_nested_metadata_is_400(service, alice):
    good = json.dumps(line("a")).encode()
    for meta in ("[" * 4_000 + "]" * 4_000, '{"a": ' * 2_000 + '"b"' + "}" * 2_000,
                 '{"k": "\\ud800"}', '{"\\udc00": "v"}'):
        err = refused_raw(service, alice, "/v1/batches", good, params={"metadata": meta},
                          headers={"Content-Type": "application/jsonl"})
        assert err["param"] == "metadata", err


def test_bad_batch_lines_are_line_errors_and_only_good_lines_are_queued(service, roomy):
    alice = roomy
    url = service[3]
    lines = [json.dumps(line("ok-1")).encode(),
             json.dumps(line("nan")).replace('"max_tokens": 2', '"temperature": NaN').encode(),
             json.dumps(line("inf", temperature=1e999)).replace("Infinity", "1e999").encode(),
             json.dumps(line("stop", stop="\ud800")).encode(),
             json.dumps(line("prompt", prompt="x\udfff")).encode(),
             b"[" * 100_000 + b"]" * 100_000,
             json.dumps(line("ok-2", stop=["\U0001F600"])).encode()]
    before = counts(url)
    r = alice.post("/v1/batches", content=b"\n".join(lines),
                   headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 201, r.text
    batch = r.json()
    errs = {e["line"]: e for e in batch["errors"]["data"]}
    assert sorted(errs) == [2, 3, 4, 5, 6]
    assert errs[2]["code"] == "invalid_json" and "NaN" in errs[2]["message"]
    assert errs[3]["param"] == "body.temperature" and "finite" in errs[3]["message"]
    assert errs[4]["code"] == "invalid_text" and errs[4]["param"] == "body.stop"
    assert errs[5]["code"] == "invalid_text" and errs[5]["param"] == "body.prompt"
    assert errs[6]["code"] == "json_too_deep"
    assert counts(url)["jobs"] == before["jobs"] + 2
    listed = alice.get("/v1/jobs", params={"batch_id": batch["id"]})
    assert listed.status_code == 200
    assert sorted(j["custom_id"] for j in listed.json()["data"]) == ["ok-1", "ok-2"]


def test_a_batch_of_only_bad_lines_is_400_listing_each(service, alice):
    raw = b"\n".join([json.dumps(line("s", stop="\ud800")).encode(), b"[" * 4_000])
    err = refused_raw(service, alice, "/v1/batches", raw,
                      headers={"Content-Type": "application/jsonl"})
    assert err["code"] == "no_valid_lines"
    assert [(e["line"], e["code"]) for e in err["lines"]] == [(1, "invalid_text"),
                                                             (2, "json_too_deep")]


def test_adapter_registration_refuses_surrogates(service, alice, roots):
    for body in ({"name": "x", "source": str(roots[0] / "good") + "\ud800"},
                 {"name": "x", "source": "owner/repo", "revision": "\udc00"}):
        err = refused_raw(service, alice, "/v1/adapters", json.dumps(body).encode())
        assert err["code"] == "invalid_text"


def test_chunked_body_over_the_limit_is_413(service, alice):
    # no Content-Length: the body is counted while it streams in
    def chunks():
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1024
        yield b'"}'
    err = refused_raw(service, alice, "/v1/jobs", chunks(), status=413)
    assert "4096 bytes" in err["message"] and err["code"] == "request_too_large"


def test_the_queue_refuses_what_it_cannot_store(service, alice):
    """Callers of the Python API (lorry run, scripts) meet the same rules at the queue."""
    from lorry.scheduler import JobSpec
    from lorry.scheduler.errors import InvalidJob

    _, queue, _, url = service
    before = counts(url)
    for spec, needle in ((JobSpec(None, prompt="x", sampling={"stop": ["\ud800"]}), "surrogate"),
                         (JobSpec(None, prompt="x\udfff"), "surrogate"),
                         (JobSpec(None, prompt="x", sampling={"temperature": float("nan")}),
                          "nan"),
                         (JobSpec(None, prompt="x", idempotency_key="\ud800"), "surrogate")):
        with pytest.raises(InvalidJob, match=needle):
            queue.submit(alice.tenant.id, [spec])
    with pytest.raises(InvalidJob, match="surrogate"):
        queue.create_batch(alice.tenant.id, [JobSpec(None, prompt="x", custom_id="a")],
                           metadata={"k": "\ud800"})
    assert counts(url) == before


def test_every_error_has_the_one_shape(service, alice):
    app, queue, _, _ = service
    capped, key = queue.create_tenant("capped", max_queued=0)
    cases = [
        (client(app, None).get("/v1/jobs"), 401, "authentication_error", "missing_api_key"),
        (alice.get("/v1/jobs/job_nope"), 404, "not_found_error", "job_not_found"),
        (alice.get("/v1/batches/batch_nope"), 404, "not_found_error", "batch_not_found"),
        (alice.get("/v1/nothing-here"), 404, "not_found_error", "not_found"),
        (alice.delete("/v1/jobs"), 405, "invalid_request_error", "method_not_allowed"),
        (alice.post("/v1/jobs", json={"prompt": "x" * 5000}), 413, "invalid_request_error",
         "request_too_large"),
        (alice.post("/v1/jobs", json={"prompt": "x", "sampling": {"top_k": -5}}), 422,
         "invalid_request_error", "greater_than_equal"),
        (alice.get("/v1/jobs", params={"limit": 0}), 422, "invalid_request_error",
         "greater_than_equal"),
        (client(app, key).post("/v1/jobs", json={"prompt": "x"}), 429, "rate_limit_error",
         "quota_exceeded"),
    ]
    for r, status, kind, code in cases:
        assert r.status_code == status, r.text
        assert r.json() == {"error": {"message": r.json()["error"]["message"], "type": kind,
                                      "param": r.json()["error"]["param"], "code": code}}, r.text
        assert r.json()["error"]["message"]
    r = alice.post("/v1/jobs", json={"prompt": "x", "sampling": {"top_k": -5}})
    assert r.json()["error"]["param"] == "sampling.top_k"


def test_openapi_documents_the_error_shape(service, alice):
    spec = alice.get("/openapi.json").json()
    ref = "#/components/schemas/ErrorBody"
    for path, method, statuses in (("/v1/jobs", "post", ("401", "413", "422", "429", "503")),
                                   ("/v1/jobs/{job_id}", "get", ("401", "404", "503")),
                                   ("/v1/batches", "post", ("400", "401", "413", "429", "503")),
                                   ("/v1/adapters", "post", ("401", "422", "503")),
                                   ("/metrics", "get", ("401", "404", "503"))):
        responses = spec["paths"][path][method]["responses"]
        for status in statuses:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": ref}, (path, status, schema)
    assert set(spec["components"]["schemas"]["ErrorDetail"]["properties"]) >= SHAPE
    # OpenAI's routes answer an invalid request 400, never FastAPI's 422 shape
    for path, ops in spec["paths"].items():
        if path.startswith(("/v1/chat", "/v1/completions", "/v1/files", "/v1/batches",
                            "/v1/models")):
            for method, op in ops.items():
                assert "422" not in op["responses"], (path, method)
                if op.get("parameters") or op.get("requestBody"):
                    assert "400" in op["responses"], (path, method)


def test_one_long_stop_string_is_one_stop_not_many(service, roomy):
    """A stop string of 17+ characters was refused as "at most 16 items"; the 16 counts
    strings in a list, and a string has its own limit, in characters."""
    alice = roomy
    marker = "### End of answer"
    r = alice.post("/v1/jobs", json={"prompt": "x", "sampling": {"stop": marker}})
    assert r.status_code == 201, r.text
    assert r.json()["sampling"]["stop"] == marker
    from lorry.api.schemas import ChatCompletionRequest
    assert ChatCompletionRequest.model_validate(
        {"model": "base", "messages": [{"role": "user", "content": "x"}], "stop": marker}
    ).sampling()["stop"] == marker
    err = refused_raw(service, alice, "/v1/jobs", json.dumps(
        {"prompt": "x", "sampling": {"stop": [f"s{i}" for i in range(17)]}}).encode())
    assert err["param"] == "sampling.stop" and "at most 16 items" in err["message"], err
    err = refused_raw(service, alice, "/v1/jobs", json.dumps(
        {"prompt": "x", "sampling": {"stop": "x" * 1001}}).encode())
    assert err["param"] == "sampling.stop" and "1000 characters" in err["message"], err
    err = refused_raw(service, alice, "/v1/chat/completions", json.dumps(
        {"model": "base", "messages": [{"role": "user", "content": "x"}],
         "user": "u" * 300}).encode())
    assert err["param"] == "user" and "256 characters" in err["message"], err
    # batch lines: the fast path and pydantic's agree
    lines = [json.dumps(line("long", stop=marker)), json.dumps(line("list", stop=[marker] * 2)),
             json.dumps(line("odd", stop=marker, user=None)),
             json.dumps(line("too-long", stop="x" * 1001)),
             json.dumps(line("empty", stop=""))]
    r = alice.post("/v1/batches", content="\n".join(lines).encode(),
                   headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 201, r.text
    assert [(e["line"], e["param"]) for e in r.json()["errors"]["data"]] == [
        (4, "body.stop"), (5, "body.stop")]
    jobs = alice.get("/v1/jobs", params={"batch_id": r.json()["id"]}).json()["data"]
    assert {j["custom_id"]: j["sampling"]["stop"] for j in jobs} == {
        "long": marker, "list": [marker] * 2, "odd": marker}


def test_param_names_the_request_field_not_the_schema(service, alice):
    """A union's member tags ("function-after[_storable(), str]") stay out of ``param``."""
    chat = {"model": "base", "messages": [{"role": "user", "content": 5}]}
    err = refused_raw(service, alice, "/v1/chat/completions", json.dumps(chat).encode())
    assert err["param"] == "messages[0].content", err
    assert "function-after" not in err["message"], err
    chat["messages"][0]["content"] = [{"type": "image_url", "image_url": {"url": "x"}}]
    err = refused_raw(service, alice, "/v1/chat/completions", json.dumps(chat).encode())
    assert err["param"] == "messages[0].content[0].type", err


def test_batch_lines_take_the_chat_routes_messages(service, roomy):
    """developer messages and text parts, as the chat route takes them (refused before)."""
    alice = roomy
    chat = {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "base", "max_tokens": 2, "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hel"},
                                             {"type": "text", "text": "lo"}]}]}}
    bad = {**chat, "custom_id": "c2", "body": {**chat["body"], "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}}
    r = alice.post("/v1/batches", content="\n".join([json.dumps(chat), json.dumps(bad)]),
                   headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 201, r.text
    assert [(e["line"], e["param"]) for e in r.json()["errors"]["data"]] == [
        (2, "body.messages[0].content[0].type")]
    job, = alice.get("/v1/jobs", params={"batch_id": r.json()["id"]}).json()["data"]
    assert job["messages"] == [{"role": "system", "content": "be brief"},
                               {"role": "user", "content": "hello"}]


def test_batch_metadata_keys_have_one_rule_on_both_routes(service, alice):
    """Keys over 64 characters were refused by the SDK's route only, and keys starting with
    lorry_ were stored and then never shown: both routes now refuse both, naming the rule."""
    good = json.dumps(line("a")).encode()
    upload = alice.post("/v1/files", files={"file": ("in.jsonl", good)},
                        data={"purpose": "batch"})
    assert upload.status_code in (200, 201), upload.text
    for meta in ({"k" * 65: "v"}, {"lorry_endpoint": "mine"}, {"lorry_x": "1"}):
        err = refused_raw(service, alice, "/v1/batches", good, params={
            "metadata": json.dumps(meta)}, headers={"Content-Type": "application/jsonl"})
        assert err["param"] == "metadata" and "lorry_" in err["message"], err
        err = refused_raw(service, alice, "/v1/batches", json.dumps({
            "input_file_id": upload.json()["id"], "endpoint": "/v1/completions",
            "metadata": meta}).encode())
        assert err["param"] == "metadata" and "lorry_" in err["message"], err
    r = alice.post("/v1/batches", content=good, params={"metadata": json.dumps(
        {"k" * 64: "v", "team": "x"})}, headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 201 and r.json()["metadata"] == {"k" * 64: "v", "team": "x"}


def test_request_keys_named_like_types_keep_their_names(service, alice, roomy):
    """Only what names nothing in the request (a union member) leaves ``param``: a client's
    own key "int" or "list" stays (an early version dropped them)."""
    chat = {"model": "base", "messages": [{"role": "user", "content": "x"}], "int": 1}
    err = refused_raw(service, alice, "/v1/chat/completions", json.dumps(chat).encode())
    assert err["param"] == "int" and err["code"] == "extra_forbidden", err
    chat = {"model": "base", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "list": 1}]}]}
    err = refused_raw(service, alice, "/v1/chat/completions", json.dumps(chat).encode())
    assert err["param"] == "messages[0].content[0].list", err
    bad = line("b", prompt="")
    r = roomy.post("/v1/batches", content="\n".join([json.dumps(line("a")), json.dumps(bad)]),
                   headers={"Content-Type": "application/jsonl"})
    (e,) = r.json()["errors"]["data"]
    assert e["param"] == "body.prompt" and "at least 1 character" in e["message"], e


def test_whole_number_floats_are_ints(service, alice, roomy):
    """16.0 is how Python's json.dumps and dataframe exports write an int: taken as 16;
    16.5 is refused."""
    r = alice.post("/v1/jobs", json={"prompt": "x", "priority": 1.0,
                                     "sampling": {"max_tokens": 16.0}})
    assert r.status_code == 201, r.text
    assert r.json()["sampling"]["max_tokens"] == 16 and r.json()["priority"] == 1
    err = refused_raw(service, alice, "/v1/jobs", b'{"prompt": "x", "sampling": '
                      b'{"max_tokens": 16.5}}')
    assert err["param"] == "sampling.max_tokens", err
    r = roomy.post("/v1/batches", content=json.dumps(line("a", max_tokens=16.0)).encode(),
                   headers={"Content-Type": "application/jsonl"})
    assert r.status_code == 201 and r.json()["request_counts"]["failed"] == 0, r.text


def test_a_batch_lines_own_key_named_like_a_type_keeps_its_name(roomy):
    bad = line("b", int=1)
    r = roomy.post("/v1/batches", content="\n".join([json.dumps(line("a")), json.dumps(bad)]),
                   headers={"Content-Type": "application/jsonl"})
    (e,) = r.json()["errors"]["data"]
    assert e["param"] == "body.int", e
