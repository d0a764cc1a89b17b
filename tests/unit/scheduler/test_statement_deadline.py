"""The statement deadline's parts that need no server: the watchdog shuts down the socket of a
wait past its limit and never one whose wait ended, and the server's statement_timeout is
added to libpq's options without overriding an operator's own."""
from __future__ import annotations

import socket
import time

import pytest

from lorry.scheduler import JobQueue
from lorry.scheduler.deadline import Watchdog, client_limit, with_statement_timeout


def test_a_wait_past_its_limit_has_its_socket_shut_down():
    dog = Watchdog()
    ours, server = socket.socketpair()
    with ours, server:
        token = dog.begin(ours.fileno(), 5.0)
        assert dog.sweep(time.monotonic() + 1) == 0          # within its limit: left alone
        assert dog.sweep(time.monotonic() + 6) == 1
        assert ours.recv(1) == b""                           # a blocked read ends
        assert server.recv(1) == b""                         # the server sees the close
        dog.end(token)
        assert dog.sweep(time.monotonic() + 60) == 0         # cut once


def test_a_socket_whose_wait_ended_is_never_touched():
    dog = Watchdog()
    ours, server = socket.socketpair()
    with ours, server:
        dog.end(dog.begin(ours.fileno(), 5.0))               # a statement that was answered
        assert dog.sweep(time.monotonic() + 3600) == 0       # idle for an hour after it
        server.sendall(b"x")
        assert ours.recv(1) == b"x"


def test_a_descriptor_number_reused_by_another_socket_is_not_shut_down():
    # libpq may close its socket inside a wait (a read error); the number can then name
    # another socket (Redis, HTTP) before the wait ends: the watchdog leaves that one alone
    dog = Watchdog()
    gone, _peer = socket.socketpair()
    fd = gone.fileno()
    dog.begin(fd, 1.0)
    gone.close()
    _peer.close()
    other, server = socket.socketpair()
    with other, server:
        assert other.fileno() == fd                          # the number, reused
        assert dog.sweep(time.monotonic() + 5) == 1          # the late wait is dropped ...
        server.sendall(b"x")
        assert other.recv(1) == b"x"                         # ... and the new socket works


def test_the_server_timeout_joins_the_operators_options():
    assert with_statement_timeout(None, 60) == "-c statement_timeout=60000"
    assert with_statement_timeout("-c search_path=lorry", 2.5) == \
        "-c search_path=lorry -c statement_timeout=2500"
    assert with_statement_timeout("-c statement_timeout=5min", 60) == "-c statement_timeout=5min"
    assert client_limit(2) == 4 and client_limit(60) == 70


def test_a_negative_timeout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="statement_timeout_seconds must be a number >= 0"):
        JobQueue(f"sqlite:///{tmp_path / 'q.db'}", statement_timeout_seconds=-1)
