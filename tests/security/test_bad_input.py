"""Bad input: each refused with a clear 4xx naming what was wrong, and nothing changed."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.security.conftest import counts


def refused(service, c, method: str, path: str, status: int, *needles: str, **kw):
    """Send the request; assert the status, that the message names each needle, and that no
    row of any table changed."""
    url = service[3]
    before = counts(url)
    resp = c.request(method, path, **kw)
    assert resp.status_code == status, resp.text
    assert set(resp.json()) == {"error"}, resp.text
    detail = json.dumps(resp.json()["error"])
    for needle in needles:
        assert needle in detail, (needle, detail)
    assert counts(url) == before
    return resp


GOOD = {"prompt": "hello", "sampling": {"max_tokens": 4}}


def test_malformed_json_body(service, alice):
    r = refused(service, alice, "POST", "/v1/jobs", 422, "json_invalid",
                content=b'{"prompt": "hi", ', headers={"Content-Type": "application/json"})
    assert r.json()["error"]["code"] == "json_invalid" and r.json()["error"]["param"] is None


def test_an_integer_past_pythons_digit_limit_is_invalid_json_in_the_one_shape(service, alice):
    """FastAPI answered 400 "There was an error parsing the body" (a hostile-tenant audit);
    a prompt of digits is text (here only too long for the tiny model)."""
    from lorry.api.app import create_app
    from tests.security.conftest import client

    app, queue, settings, url = service
    roomy = create_app(settings.model_copy(update={"max_line_bytes": 64 * 1024}), queue=queue,
                       nudger=None, redis_client=None)   # this service's 4 KiB holds no such body
    big = b"9" * 5000
    with client(roomy, alice.key) as c:
        r = refused(service, c, "POST", "/v1/jobs", 422, "more than 4300 digits",
                    content=b'{"prompt": "x", "sampling": {"seed": ' + big + b"}}",
                    headers={"Content-Type": "application/json"})
        assert r.json()["error"]["code"] == "invalid_json"
        refused(service, c, "POST", "/v1/completions", 400, "more than 4300 digits",
                content=b'{"model": "base", "prompt": "x", "max_tokens": -' + big + b"}",
                headers={"Content-Type": "application/json"})
        digits = c.post("/v1/jobs", json={"prompt": "9" * 5000})   # text: past the checks
        assert digits.json()["error"]["code"] == "context_length_exceeded", digits.text


def test_unknown_fields_are_named(service, alice):
    refused(service, alice, "POST", "/v1/jobs", 422, "extra_forbidden", "temprature",
            json={**GOOD, "temprature": 0.5})
    refused(service, alice, "POST", "/v1/jobs", 422, "extra_forbidden", "best_of",
            json={"prompt": "x", "sampling": {"best_of": 2}})


@pytest.mark.parametrize("sampling, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 4097}, "max_tokens"),
    ({"max_tokens": -3}, "max_tokens"), ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"seed": -2**63 - 1}, "seed"), ({"stop": ""}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"temperature": "NaN"}, "temperature")])
def test_sampling_out_of_range(service, alice, sampling, field):
    refused(service, alice, "POST", "/v1/jobs", 422, field, json={"prompt": "x",
                                                                  "sampling": sampling})


def test_prompt_and_body_size_limits(service, alice):
    # a prompt over the per-prompt character limit is refused by the schema...
    refused(service, alice, "POST", "/v1/jobs", 413, "exceeds the limit of 4096 bytes",
            json={"prompt": "x" * 5000})
    # ...and any JSON body over the request limit before it is read (413, says the limit)
    refused(service, alice, "POST", "/v1/jobs", 413, "4096",
            content=b"{" + b" " * 10_000 + b"}", headers={"Content-Type": "application/json"})
    refused(service, alice, "POST", "/v1/jobs", 422, "NUL", json={"prompt": "a\x00b"})
    refused(service, alice, "POST", "/v1/jobs", 422, "exactly one of 'prompt' or 'messages'",
            json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]})


def test_unknown_adapter_is_named(service, alice):
    refused(service, alice, "POST", "/v1/jobs", 422, "unknown adapter 'nope'",
            json={**GOOD, "adapter": "nope"})


def test_another_tenants_adapter_cannot_be_used(service, alice, bob, roots):
    assert bob.post("/v1/adapters", json={"name": "bobs", "source": str(roots[0] / "good")}
                    ).status_code == 201
    refused(service, alice, "POST", "/v1/jobs", 422, "unknown adapter 'bobs'",
            json={**GOOD, "adapter": "bobs"})
    refused(service, alice, "DELETE", "/v1/adapters/bobs", 404, "no adapter 'bobs'")
    assert [a["name"] for a in alice.get("/v1/adapters").json()["data"]] == []
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": "bobs", "prompt": "x"}}
    refused(service, alice, "POST", "/v1/batches", 400, "unknown model 'bobs'",
            content=json.dumps(line).encode())


def test_adapter_paths_outside_the_roots(service, alice, roots):
    root, outside = roots
    link = root / "sneaky"
    if not link.exists():
        link.symlink_to(outside / "elsewhere")
    for source in (f"{root}/../{outside.name}/elsewhere", str(link), str(outside / "elsewhere"),
                   "/etc", "~/../../etc/passwd"):
        refused(service, alice, "POST", "/v1/adapters", 422, "outside the allowed adapter roots",
                json={"name": "x", "source": source})
    refused(service, alice, "POST", "/v1/adapters", 422, "neither an absolute local path",
            json={"name": "x", "source": "../elsewhere"})


def test_adapter_names_that_mean_the_base_model_are_refused(service, alice, roots):
    """model="base" (or the base's own name) runs the base model on the OpenAI routes and in
    batch lines, so an adapter of that name could never be reached there."""
    from pathlib import Path

    from lorry.adapters import register_shared

    _app, queue, settings, _url = service
    for name in ("base", Path(settings.model).name):
        refused(service, alice, "POST", "/v1/adapters", 422, "names the base model",
                "reserved_name", json={"name": name, "source": str(roots[0] / "good")})
    with pytest.raises(ValueError, match="names the base model"):
        register_shared(queue, settings, "base", str(roots[0] / "good"))
    assert queue.list_adapters(alice.tenant.id) == []


def test_adapters_the_engine_would_refuse(service, alice, roots, tiny_model, tmp_path):
    from lorry.testing import make_peft_adapter, make_tiny_llama

    root = roots[0]
    if not (root / "r32").exists():
        make_peft_adapter(tiny_model, root / "r32", r=32, seed=3)
        wider = make_tiny_llama(tmp_path / "wider", hidden_size=96, num_heads=4, num_kv_heads=2)
        make_peft_adapter(wider, root / "wrong-shapes", r=8, seed=4)
    refused(service, alice, "POST", "/v1/adapters", 422, "rank", "32", "16",
            json={"name": "big", "source": str(root / "r32")})
    refused(service, alice, "POST", "/v1/adapters", 422, "adapter refused", "shape",
            json={"name": "wide", "source": str(root / "wrong-shapes")})
    (root / "empty").mkdir(exist_ok=True)
    refused(service, alice, "POST", "/v1/adapters", 422, "adapter refused",
            json={"name": "empty", "source": str(root / "empty")})
    # a config a tenant wrote by hand: fields of the wrong type, a bad pattern, deep nesting
    # (each was a 500 that also dropped the client's connection)
    good_cfg = json.loads((root / "r32" / "adapter_config.json").read_text())
    for name, cfg, words in (
            ("tm-int", {**good_cfg, "target_modules": 123}, "target_modules=123"),
            ("bad-pattern", {**good_cfg, "rank_pattern": {"[": 4}}, "allowed are"),
            ("slow-pattern", {**good_cfg, "rank_pattern": {"(.|.)*z": 4}}, "repetition"),
            ("flags", {**good_cfg, "rank_pattern": {"(?i)q_proj": 4}}, "rank_pattern key"),
            ("deep", None, "nested too deeply")):
        bad = root / name
        if not bad.exists():
            shutil.copytree(root / "r32", bad)
            (bad / "adapter_config.json").write_text(
                json.dumps(cfg) if cfg else "[" * 100_000 + "]" * 100_000)
        refused(service, alice, "POST", "/v1/adapters", 422, "adapter refused", words,
                json={"name": name, "source": str(bad)})
    assert alice.get("/v1/adapters").status_code == 200  # the connection was kept


def test_jsonl_bad_lines_reported_per_line_good_lines_kept(service, alice):
    url = service[3]
    good = {"custom_id": "ok-1", "method": "POST", "url": "/v1/completions",
            "body": {"model": "base", "prompt": "hi", "max_tokens": 2}}
    lines = [json.dumps(good), "{not json", json.dumps({**good, "custom_id": "ok-2"}),
             json.dumps({**good, "custom_id": "bad-t", "body": {**good["body"],
                                                                 "temperature": 9}}),
             json.dumps({**good, "custom_id": "bad-f", "extra": 1})]
    before = counts(url)
    r = alice.post("/v1/batches", content="\n".join(lines).encode())
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["request_counts"] == {"total": 5, "completed": 0, "failed": 3}
    errs = {e["line"]: e for e in body["errors"]["data"]}
    assert sorted(errs) == [2, 4, 5]
    assert errs[2]["code"] == "invalid_json" and "temperature" in errs[4]["message"]
    assert "extra" in errs[5]["message"]
    assert counts(url)["jobs"] == before["jobs"] + 2


def test_batch_limits_and_duplicates(service, alice):
    line = {"custom_id": "c", "method": "POST", "url": "/v1/completions",
            "body": {"model": "base", "prompt": "hi"}}

    def jsonl(n):
        return "".join(json.dumps({**line, "custom_id": f"c{i}"}) + "\n" for i in range(n))
    refused(service, alice, "POST", "/v1/batches", 413, "20 lines", content=jsonl(21).encode())
    refused(service, alice, "POST", "/v1/batches", 413, "limit of 32768 bytes",
            content=jsonl(19).encode() * 30)
    huge = json.dumps({**line, "body": {"model": "base", "prompt": "y" * 5000}})
    refused(service, alice, "POST", "/v1/batches", 413, "line 1", content=huge.encode())
    dup = (json.dumps(line) + "\n") * 2
    refused(service, alice, "POST", "/v1/batches", 400, "duplicate_custom_id", "line 2",
            content=dup.encode())
    refused(service, alice, "POST", "/v1/batches", 400, "line 1",
            content=b"garbage\n{]\n")
    refused(service, alice, "POST", "/v1/batches", 400, "completion_window",
            content=jsonl(1).encode(), params={"completion_window": "forever"})


def test_an_unreadable_sqlite_file_is_503_and_readyz_shows_no_sql(service, alice, caplog):
    """A database file overwritten with other bytes: every route answers 503 with
    Retry-After (a 500 before), and the unauthenticated /readyz says so without the driver's
    message (which held the SQL and the file's errors); the cause goes to the log."""
    import os
    from pathlib import Path

    path = Path(service[3].removeprefix("sqlite:///"))
    assert alice.get("/v1/jobs").status_code == 200
    path.write_bytes(os.urandom(300_000))
    service[1].engine.dispose()  # as a server started on that file: no connection open on it
    for route in ("/v1/jobs", "/v1/batches", "/v1/files", "/v1/adapters"):
        r = alice.get(route)
        assert r.status_code == 503, (route, r.text)
        assert r.headers.get("Retry-After") and set(r.json()) == {"error"}
    ready = alice.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "database": "not answering"}
    assert "SELECT" not in ready.text and "sqlite" not in ready.text.lower()
