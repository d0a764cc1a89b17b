"""Network stand-ins for tests: a listener that accepts connections and never answers (a
frozen server, or a host gone from the network behind a proxy), and a TCP proxy that can be
frozen with its connections open (a server stopped with SIGSTOP, seen from its clients)."""
from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """Accepts every connection and never sends a byte; yields its port on 127.0.0.1."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    accepted, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        sock.close()


class FreezableProxy:
    """Forwards connections on 127.0.0.1:``port`` to ``target``; ``freeze()`` stops it reading,
    writing and accepting, its sockets left open, so that every client's data is acknowledged
    by the kernel and never answered, as by a frozen server; ``thaw()`` goes on as before."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.port = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._peers: dict[socket.socket, socket.socket] = {}
        self._want_frozen, self._frozen, self._stop = (threading.Event(), threading.Event(),
                                                       threading.Event())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def freeze(self) -> None:
        self._want_frozen.set()
        assert self._frozen.wait(5), "the proxy did not freeze"

    def thaw(self) -> None:
        self._want_frozen.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in list(self._peers) + [self._listener]:
            sock.close()
        self._sel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._want_frozen.is_set():
                self._frozen.set()
                self._stop.wait(0.02)
                continue
            self._frozen.clear()
            for key, _ in self._sel.select(timeout=0.02):
                if self._want_frozen.is_set():
                    break  # (frozen from here on: what is not read yet stays unread)
                if key.fileobj is self._listener:
                    self._accept()
                else:
                    self._forward(key.fileobj)

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        server.settimeout(None)
        self._peers[client], self._peers[server] = server, client
        self._sel.register(client, selectors.EVENT_READ)
        self._sel.register(server, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        peer = self._peers.get(sock)
        if peer is None:
            return
        try:
            data = sock.recv(65536)
            if data:
                peer.sendall(data)
                return
        except OSError:
            pass
        for end in (sock, peer):   # one side closed: close the other, as a server would
            self._sel.unregister(end)
            self._peers.pop(end, None)
            end.close()


@contextlib.contextmanager
def freezable_proxy(target: tuple[str, int]) -> Iterator[FreezableProxy]:
    proxy = FreezableProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()
