"""Start and stop real service processes for the e2e tests (process groups, logs in files)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

LORRY = [sys.executable, "-c", "from lorry.cli import app; app()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A `lorry ...` subprocess in its own process group, its output in ``log``."""

    def __init__(self, name: str, args: list[str], env: dict, log_dir: Path):
        self.name, self.log = name, log_dir / f"{name}.log"
        self._out = open(self.log, "wb")
        self.popen = subprocess.Popen(LORRY + args, env=env, stdout=self._out,
                                      stderr=subprocess.STDOUT, start_new_session=True,
                                      cwd=Path(__file__).resolve().parents[1])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 4000) -> str:
        return self.log.read_bytes()[-n:].decode(errors="replace")

    def stop(self, grace: float = 15.0) -> None:
        if self.alive():
            pgid = os.getpgid(self.popen.pid)
            os.killpg(pgid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                self.popen.wait(10)
        self._out.close()


def wait_until(check, timeout: float, what: str, procs: list[Proc] = ()):
    """Poll ``check()`` until it returns a truthy value; fail with the processes' logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise AssertionError(f"{p.name} exited while waiting for {what}:\n{p.tail()}")
        try:
            value = check()
        except (httpx.HTTPError, OSError):
            value = None
        if value:
            return value
        time.sleep(0.3)
    logs = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")


def run_cli(args: list[str], env: dict) -> str:
    out = subprocess.run(LORRY + args, env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, f"lorry {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout
