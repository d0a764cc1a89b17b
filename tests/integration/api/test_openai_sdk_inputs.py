"""Inputs an OpenAI user sends through the official `openai` SDK, over the real app and the
real PostgreSQL (a fresh database for the module), a thread playing the worker."""
from __future__ import annotations

import io
import json
import threading

import openai
import pytest
from fastapi.testclient import TestClient

from lorry.testing import make_tiny_llama
from tests.integration.scheduler.conftest import migrated_pg_database

BOM = b"\xef\xbb\xbf"


@pytest.fixture(scope="module")
def pg_url():
    with migrated_pg_database() as url:
        yield url


@pytest.fixture(scope="module")
def service(pg_url, tmp_path_factory):
    """(app, queue) over the module's database; a tiny model for the prompt-length checks."""
    from lorry.api.app import create_app
    from lorry.scheduler import JobQueue
    from lorry.settings import Settings

    model = make_tiny_llama(tmp_path_factory.mktemp("sdk-model") / "tiny-llama")
    settings = Settings(database_url=pg_url, model=str(model), max_model_len=128,
                        adapter_roots=[str(tmp_path_factory.mktemp("sdk-adapters"))])
    queue = JobQueue(pg_url)
    yield create_app(settings, queue=queue, nudger=None, redis_client=None), queue
    queue.close()


@pytest.fixture
def client(service):
    """The SDK of a new tenant; a 500 comes back as the answer, as a real server sends it."""
    app, queue = service
    _, key = queue.create_tenant("sdk-user")
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, max_retries=0,
                         http_client=TestClient(app, raise_server_exceptions=False))


@pytest.fixture
def worker(service):
    """Completes every queued job with the text "ok"."""
    from lorry.scheduler import Result

    queue, stop = service[1], threading.Event()

    def run():
        while not stop.wait(0.01):
            for mb in queue.claim("sdk-worker", [], [], 8):
                for job in mb.jobs:
                    queue.complete(job.id, job.lease_token, Result("ok", [1], "stop", 3, 1))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join()


def _line(cid: str, **body) -> bytes:
    body = {"model": "base", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": body}).encode() + b"\n"


def test_files_list_with_a_nul_in_purpose_is_a_400_not_a_500(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.files.list(purpose="batch\x00")
    assert e.value.body["param"] == "purpose"
    assert [f.id for f in client.files.list(purpose="batch")] == []  # the server still answers


def test_a_byte_order_mark_does_not_refuse_the_first_line(client):
    """Windows tools start UTF-8 files with a BOM: the first line is read as any other, also
    when it has fields only the full check reads (text parts, a message's name)."""
    parts = _line("parts", messages=[{"role": "user", "content": [{"type": "text",
                                                                   "text": "hi"}]}])
    named = _line("named", messages=[{"role": "user", "content": "hi", "name": "ann"}])
    for first, second in ((parts, named), (named, parts)):
        f = client.files.create(file=("in.jsonl", io.BytesIO(BOM + first + second)),
                                purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        assert batch.errors is None and batch.status == "in_progress"
        assert (batch.request_counts.total, batch.request_counts.failed) == (2, 0)


def test_a_byte_order_mark_keeps_the_first_lines_own_error(client):
    f = client.files.create(file=("in.jsonl", io.BytesIO(BOM + _line("a", foo=1)
                                                         + _line("b"))), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    [error] = batch.errors.data
    assert (error.line, error.param, error.custom_id) == (1, "body.foo", "a")


def test_a_byte_order_mark_alone_on_the_first_line_is_a_blank_line(client):
    f = client.files.create(file=("in.jsonl", io.BytesIO(BOM + b"\n" + _line("a"))),
                            purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    assert batch.errors is None and batch.request_counts.total == 1


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_stream_null_means_not_streamed(client, worker, route):
    """OpenAI's `stream` is a nullable boolean, as every other option here."""
    if route == "chat":
        out = client.chat.completions.create(model="base", max_tokens=2, extra_body={
            "stream": None}, messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].message.content == "ok"
    else:
        out = client.completions.create(model="base", prompt="hi", max_tokens=2,
                                        extra_body={"stream": None})
        assert out.choices[0].text == "ok"


@pytest.mark.parametrize("window", ["169h", "9999h"])
def test_a_completion_window_past_a_week_names_the_field(client, window):
    f = client.files.create(file=("in.jsonl", io.BytesIO(_line("a"))), purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                              completion_window=window)
    assert e.value.body["param"] == "completion_window"
    assert "1h to 168h" in e.value.body["message"]
    assert list(client.batches.list()) == []


def test_a_one_step_upload_past_a_week_names_the_field(service):
    app, queue = service
    _, key = queue.create_tenant("one-step")
    with TestClient(app) as c:
        r = c.post("/v1/batches", params={"completion_window": "169h"}, content=_line("a"),
                   headers={"Authorization": f"Bearer {key}",
                            "Content-Type": "application/jsonl"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "completion_window"
