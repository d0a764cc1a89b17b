"""What a new user of the client and the `lorry` CLI meets at the edges: values JSON cannot
carry, a server that stops answering, an unknown migration, a --database that cannot be used,
progress bars mixed into the output a script reads, Hub ids where they are disabled."""
from __future__ import annotations

import json
import threading

import httpx
import pytest
from typer.testing import CliRunner

from lorry.cli import app
from lorry.errors import InvalidRequest, LorryError, WaitTimeout
from tests.net import silent_listener
from tests.unit.api.conftest import finish_all
from tests.unit.client.test_cli_mistakes import _refused


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_sampling_value_is_an_invalid_request_naming_the_field(make_client,
                                                                            monkeypatch, value):
    """It was httpx's ValueError 'Out of range float values are not JSON compliant' (and a
    traceback from `lorry submit --temperature nan`)."""
    import lorry.cli_client as cli_client

    c, _ = make_client("acme")
    with pytest.raises(InvalidRequest, match="sampling.temperature") as e:
        c.submit("hi", temperature=value)
    assert (e.value.param, e.value.code) == ("sampling.temperature", "finite_number")
    assert list(c.list()) == []
    monkeypatch.setattr(cli_client, "_client", lambda url, key: c)
    result = CliRunner().invoke(app, ["submit", "hi", "--temperature", str(value), "--key", "k"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    assert "sampling.temperature" in result.output


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers; yields its URL."""
    with silent_listener() as port:
        yield f"http://127.0.0.1:{port}"


def test_wait_gives_up_at_its_timeout_on_a_server_that_does_not_answer(silent_server):
    """wait(timeout=0.3) sat in one request for the client's whole HTTP timeout and then
    raised 'cannot reach ... ReadTimeout', not WaitTimeout."""
    from lorry.client import Client

    with Client(silent_server, "k", timeout=5) as c:
        with pytest.raises(WaitTimeout, match="job_x"):
            c.wait("job_x", timeout=0.3)
        with pytest.raises(WaitTimeout, match="batch_x"):
            c.wait_batch("batch_x", timeout=0.3)


@pytest.fixture
def slow_server():
    """A server whose every answer takes 0.5 s; job_x is running until 1.5 s after the first
    request arrived, then succeeded. Yields its URL."""
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    first: list[float] = []

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):
            now = time.monotonic()
            first[:] = first or [now]
            done = now - first[0] > 1.5
            time.sleep(0.5)
            body = json.dumps({"id": "job_x", "status": "succeeded" if done else "running",
                               "result": {"text": "hi"} if done else None}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_last_poll_near_the_deadline_still_returns_the_finished_job(slow_server):
    """Each poll's request was cut to the time left (at least 0.05 s): the last poll of a wait
    (sent at its deadline, 1.9 s, after the job was done at 1.5 s) against a server that
    answers in 0.5 s timed out, and the wait was a WaitTimeout."""
    from lorry.client import Client

    with Client(slow_server, "k", timeout=5) as c:
        job = c.wait("job_x", timeout=1.9, poll_interval=0.4)
    assert job.status == "succeeded" and job.text == "hi"


def test_a_wait_with_no_poll_interval_still_pauses_between_polls():
    """poll_interval=0 polled without a pause (0 x 1.5 stays 0): thousands of requests a
    second at the server for as long as the job ran."""
    from lorry.client import Client

    seen = []

    def running(request):
        seen.append(request)
        return httpx.Response(200, json={"id": "job_x", "status": "running"})
    http = httpx.Client(base_url="http://api", transport=httpx.MockTransport(running))
    with Client("http://api", "k", http_client=http) as c:
        with pytest.raises(WaitTimeout):
            c.wait("job_x", timeout=0.5, poll_interval=0, max_interval=0.1)
    assert 3 <= len(seen) <= 12, len(seen)


def test_pages_of_another_shape_are_client_errors():
    """adapters() and batches() raised KeyError on a JSON answer without 'data'."""
    from lorry.client import Client

    http = httpx.Client(base_url="http://proxy", transport=httpx.MockTransport(
        lambda request: httpx.Response(200, json={"hello": "world"})))
    with Client("http://proxy", "k", http_client=http) as odd:
        for call in (odd.adapters, lambda: list(odd.batches())):
            with pytest.raises(LorryError, match="no Lorry API object"):
                call()


def test_db_upgrade_to_an_unknown_revision_is_one_line(env):
    """It was alembic's CommandError as a traceback, exit status 1."""
    _refused(["db", "upgrade", "nosuchrev"], "nosuchrev", "lorry db upgrade")


@pytest.mark.parametrize("url, says", [
    ("postgresql+psycopg://u:s3cret@127.0.0.1:1/x", "cannot use the job database "
                                                    "postgresql+psycopg://u:***@127.0.0.1:1/x"),
    ("nonsense", "--database is not a database URL"),
    ("mysql://u:s3cret@db/x", "names a mysql database"),
])
def test_run_with_a_database_it_cannot_use_is_one_line_without_its_password(env, tmp_path,
                                                                            url, says):
    """`lorry run --database` of a server that is down, or of a URL SQLAlchemy cannot use,
    was a traceback with exit status 1 (the status of a failed request)."""
    batch = tmp_path / "in.jsonl"
    batch.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                 "body": {"model": "base", "prompt": "hi"}}) + "\n")
    out = _refused(["run", str(batch), "-o", str(tmp_path / "out.jsonl"), "--database", url],
                   says)
    assert "s3cret" not in out


def test_progress_bars_go_to_stderr_and_stdout_keeps_what_scripts_read(service, make_client,
                                                                        monkeypatch, tmp_path):
    """The --wait progress bar was drawn on stdout, before the paths (or the batch's final
    state) that a script reads there."""
    import lorry.cli_client as cli_client

    _, queue, *_ = service
    c, _ = make_client("acme")
    monkeypatch.setattr(cli_client, "_client", lambda url, key: c)
    batch = c.submit_batch([{"custom_id": "r0", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "base", "max_tokens": 2,
                                      "messages": [{"role": "user", "content": "q"}]}}])
    finish_all(queue)
    queue.finalize_batches()
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["batch", "download", batch.id, "--wait", "-o", str(out),
                                      "--key", "k"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{out}\n"
    assert batch.id in result.stderr  # the bar


def test_embedded_runs_draw_their_progress_on_stderr(monkeypatch, capsys):
    import lorry.workers.runtime as runtime
    from lorry.embedded import drain_with_progress

    class Summary:
        def to_dict(self):
            return {"tokens": 0}

    class Drainer:
        def run(self, stop_when_empty):
            return Summary()

    monkeypatch.setattr(runtime, "build_drainer", lambda *a, **kw: Drainer())
    drain_with_progress(None, None, 3, "3 requests")
    captured = capsys.readouterr()
    assert captured.out == "" and "3 requests" in captured.err


def test_the_operators_adapter_add_keeps_hub_ids_off_when_they_are_disabled(env, tiny_model):
    """LORRY_ALLOW_HUB_ADAPTERS=false refused Hub ids over the API only: `lorry adapter add`
    registered them."""
    env.setenv("LORRY_MODEL", str(tiny_model))
    env.setenv("LORRY_ALLOW_HUB_ADAPTERS", "false")
    assert CliRunner().invoke(app, ["db", "upgrade"]).exit_code == 0
    _refused(["adapter", "add", "hubby", "someone/adapter"], "Hub adapters are disabled")
    listed = CliRunner().invoke(app, ["adapter", "list"])
    assert listed.exit_code == 0 and "hubby" not in listed.output


def test_run_with_a_database_it_cannot_use_prints_one_line_only(env, tmp_path):
    """The connector's own log line ('database unavailable: ...') came before the error."""
    import subprocess
    import sys

    batch = tmp_path / "in.jsonl"
    batch.write_text("{}\n")
    done = subprocess.run([sys.executable, "-c", "from lorry.cli import app; app()", "run",
                           str(batch), "-o", str(tmp_path / "out.jsonl"), "--database",
                           "postgresql+psycopg://u:s3cret@127.0.0.1:1/x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "check --database" in done.stderr, done.stderr


def test_a_refused_batch_submit_leaves_no_uploaded_file_behind(service, monkeypatch, tmp_path):
    """`lorry batch submit` uploads the file, then creates the batch: a refused create (an
    endpoint the service does not serve) left the upload in the tenant's files, unreferenced."""
    from fastapi.testclient import TestClient

    import lorry.cli_client as cli_client
    from lorry.client import Client

    api, queue, *_ = service
    _, key = queue.create_tenant("acme")
    monkeypatch.setattr(cli_client, "_client",
                        lambda url, k: Client("http://testserver", key,
                                              http_client=TestClient(api)))
    c = Client("http://testserver", key, http_client=TestClient(api))
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "base", "messages": [{"role": "user", "content": "hi"}]}}
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(line) + "\n")
    result = CliRunner().invoke(app, ["batch", "submit", str(path), "--endpoint",
                                      "/v1/embeddings", "--key", "k"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert "endpoint" in result.output
    assert c._request("GET", "/v1/files").json()["data"] == []
    assert list(c.batches()) == []
    # With an idempotency key the upload may be an existing batch's input (the same key
    # used before): it is kept. Deleting it took the first batch's input file away.
    first = CliRunner().invoke(app, ["batch", "submit", str(path), "--idempotency-key", "k1",
                                     "--key", "k"])
    assert first.exit_code == 0, first.output
    batch = c.batch(first.output.strip())
    typo = CliRunner().invoke(app, ["batch", "submit", str(path), "--idempotency-key", "k1",
                                    "--endpoint", "/v1/embeddings", "--key", "k"])
    assert typo.exit_code != 0 and "endpoint" in typo.output
    assert c.file(batch.input_file_id).bytes == path.stat().st_size
    c.close()
