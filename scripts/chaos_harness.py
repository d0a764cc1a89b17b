"""Fault harness: a private Redis and PostgreSQL that can be killed and restarted, the Lorry
services as real processes (api, beat, N Celery GPU workers) and job counts read from SQL.

Used by tests/chaos and scripts/soak.py; processes come from scripts/procs.py.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from glob import glob
from pathlib import Path

import httpx
from procs import Proc, free_port, run_cli, wait_until

FINAL = ("succeeded", "failed", "cancelled", "expired")


def _wait_port(port: int, timeout: float, what: str) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not listen on {port} within {timeout} s")


class RedisServer:
    """A private, memory-only redis-server (never the machine's shared one)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.popen = None
        self.start()

    def start(self) -> None:
        self.popen = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 20, "redis-server")

    def kill(self) -> None:
        """SIGKILL: everything in it (queued Celery messages, nudge keys) is gone."""
        if self.popen and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def restart_empty(self, down_seconds: float = 0.0) -> None:
        self.kill()
        time.sleep(down_seconds)
        self.start()


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (initdb in a temp dir, run as the postgres user)."""

    def __init__(self):
        bins = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise RuntimeError("no /usr/lib/postgresql/*/bin/initdb on this machine")
        self.bin = Path(bins[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="lorry-pg-"))
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as_pg:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run("initdb", "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres",
                  "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        out = subprocess.run(self._as_pg + [str(self.bin / tool), *args], capture_output=True,
                             text=True, timeout=120, check=False)
        assert out.returncode == 0, f"{tool} failed:\n{out.stdout}\n{out.stderr}"

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-o", opts, "-l",
                  str(self.dir / "pg.log"), "-w", "start")

    def stop(self, mode: str = "immediate") -> None:
        """``immediate`` is a crash for the clients: every connection drops at once."""
        self._run("pg_ctl", "-D", str(self.dir / "data"), "-m", mode, "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except AssertionError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def service_env(database_url: str, redis_url: str, model: Path, adapter_root: Path,
                data_dir: Path, **extra: str) -> dict:
    """LORRY_* for fault runs: short leases and heartbeats so faults resolve in seconds."""
    env = {**os.environ, "LORRY_DATABASE_URL": database_url, "LORRY_BROKER_URL": redis_url,
           "LORRY_MODEL": str(model), "LORRY_ADAPTER_ROOTS": str(adapter_root),
           "LORRY_DEVICE": "cpu", "LORRY_MAX_LORAS": "4", "LORRY_MAX_LORA_RANK": "16",
           "LORRY_MAX_CPU_LORAS": "8", "LORRY_MAX_NUM_SEQS": "16", "LORRY_MAX_MODEL_LEN": "128",
           "LORRY_REDIS_PREFIX": f"lorry-chaos-{uuid.uuid4().hex[:6]}",
           "LORRY_LEASE_SECONDS": "5", "LORRY_HEARTBEAT_SECONDS": "1",
           "LORRY_MAINTAIN_INTERVAL": "1", "LORRY_DRAIN_MAX_SECONDS": "20",
           "LORRY_API_PORT": str(free_port()), "LORRY_DATA_DIR": str(data_dir)}
    env.update(extra)
    return env


class Services:
    """api + beat + Celery GPU workers as processes; workers can be killed and added."""

    def __init__(self, env: dict, log_dir: Path, workers: int = 2, migrate: bool = True):
        self.env, self.logs = env, log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        if migrate:
            run_cli(["db", "upgrade"], env)
        self.api = f"http://127.0.0.1:{env['LORRY_API_PORT']}"
        self.procs: list[Proc] = [
            Proc("api", ["api"], env, log_dir),
            Proc("beat", ["beat", "--schedule", str(log_dir / "beat-schedule")], env, log_dir)]
        self.workers: list[Proc] = []
        self._n = 0
        for _ in range(workers):
            self.add_worker()
        wait_until(lambda: httpx.get(f"{self.api}/readyz").status_code == 200, 90, "the API",
                   self.procs)

    def add_worker(self) -> Proc:
        self._n += 1
        name = f"gpu{self._n}"
        env = {**self.env, "LORRY_WORKER_ID": f"chaos-{name}"}
        p = Proc(name, ["worker", "--name", f"{name}@%h", "--loglevel", "warning"], env,
                 self.logs)
        self.workers.append(p)
        self.procs.append(p)
        return p

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (Celery's solo pool runs the drain in-process)."""
        os.killpg(os.getpgid(proc.popen.pid), sig)
        if sig == signal.SIGKILL:
            proc.popen.wait(30)
            self.workers.remove(proc)
            self.procs.remove(proc)

    def live(self) -> list[Proc]:
        return [p for p in self.procs if p.alive()]

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop(grace=10)

    def logs_tail(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(3000)}" for p in self.procs)


def status_counts(database_url: str) -> dict[str, int]:
    """Jobs per status, straight from the job table."""
    from sqlalchemy import create_engine, text

    eng = create_engine(database_url)
    try:
        with eng.connect() as conn:
            rows = conn.execute(text("SELECT status, count(*) FROM jobs GROUP BY status")).all()
    finally:
        eng.dispose()
    return {s: n for s, n in rows}


def audit(database_url: str) -> dict:
    """What a run left in the table: rows, results, duplicates per (batch, custom_id)."""
    from sqlalchemy import create_engine, text

    eng = create_engine(database_url)
    try:
        with eng.connect() as conn:
            one = conn.execute(text(
                "SELECT count(*) AS rows, count(*) FILTER (WHERE status = 'succeeded') AS ok,"
                " count(*) FILTER (WHERE status = 'succeeded' AND result_token_ids IS NULL)"
                " AS ok_without_result, count(DISTINCT id) AS ids,"
                " coalesce(max(attempts), 0) AS max_attempts FROM jobs")).one()
            dup = conn.execute(text(
                "SELECT count(*) FROM (SELECT batch_id, custom_id FROM jobs"
                " WHERE custom_id IS NOT NULL GROUP BY batch_id, custom_id"
                " HAVING count(*) > 1) d")).scalar_one()
            retried = conn.execute(text(
                "SELECT count(*) FROM jobs WHERE error = 'lease expired (worker lost)'"
                " OR attempts > 1")).scalar_one()
    finally:
        eng.dispose()
    return {"rows": one.rows, "succeeded": one.ok, "succeeded_without_result":
            one.ok_without_result, "distinct_ids": one.ids, "duplicate_custom_ids": dup,
            "max_attempts": one.max_attempts, "rerun_after_fault": retried}


def wait_drained(database_url: str, total: int, timeout: float, services: Services,
                 on_tick=None) -> dict[str, int]:
    """Poll the table until ``total`` jobs are final; ``on_tick(counts)`` runs each poll."""
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            counts = status_counts(database_url)
        except Exception:  # noqa: BLE001  (the database may be the thing that is down)
            counts = {}
        if on_tick is not None:
            on_tick(counts)
        if sum(counts.get(s, 0) for s in FINAL) >= total:
            return counts
        time.sleep(0.5)
    raise AssertionError(f"not drained after {timeout} s: {counts}\n{services.logs_tail()}")


def batch_lines(n: int, models: list[str], max_tokens: int = 2, prefix: str = "r") -> list[dict]:
    """``n`` OpenAI batch lines cycling over ``models`` (adapter names or the base name)."""
    return [{"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": models[i % len(models)], "prompt": f"job {i} says",
                      "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
            for i in range(n)]
