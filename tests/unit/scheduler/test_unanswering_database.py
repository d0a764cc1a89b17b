"""A PostgreSQL server that accepts the connection and then never answers (a host gone from
the network behind a proxy, a frozen server): the queue gives up with Unavailable (the API's
503) after libpq's connect_timeout, where requests hung with no limit (an outage audit)."""
from __future__ import annotations

import threading

from lorry.scheduler import JobQueue, errors
from lorry.scheduler.connector import PG_CONNECT
from tests.net import silent_listener


def test_a_server_that_never_answers_is_unavailable_not_a_hang():
    assert PG_CONNECT["connect_timeout"] == 10
    outcome = {}

    def call(url):
        try:
            JobQueue(url).get_job("job_x", None)
            outcome[url] = "answered"
        except errors.Unavailable:
            outcome[url] = "unavailable"
        except Exception as e:  # noqa: BLE001 - any other error is a finding too
            outcome[url] = repr(e)

    # the default (10 s), and a URL's own connect_timeout, which wins
    with silent_listener() as port:
        urls = [f"postgresql+psycopg://postgres@127.0.0.1:{port}/test",
                f"postgresql+psycopg://postgres@127.0.0.1:{port}/test?connect_timeout=2"]
        threads = [threading.Thread(target=call, args=(u,), daemon=True) for u in urls]
        for t in threads:
            t.start()
        threads[1].join(8)
        assert outcome.get(urls[1]) == "unavailable", outcome   # in ~2 s, the URL's own
        threads[0].join(30)
        assert outcome.get(urls[0]) == "unavailable", outcome   # in ~10 s; it hung for good
