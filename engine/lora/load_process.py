"""Adapter loads in a process of their own, so that they take nothing of the engine's GIL.

A load in the engine's background thread makes ~150 torch calls (reading the safetensors
file, stacking and converting each slice's modules, the finiteness checks); each gives the GIL
up and must take it back, and every kernel launch of the engine's thread gives the GIL up too,
so while a load runs the two threads hand the GIL to each other at every call. On an H100 the
bulk workload's 133 cold loads (17 s of loading) cost the run 7.2 s of its 77 s where a replay
of its schedule (benchmarks/schedule_replay.py --cold-load-ms) loses nothing to waiting for
them: the loads slow the engine's thread. Whether this process wins that back is for a GPU
run to show (``benchmarks/gpu_round.sh OUT loads`` with cold_thread and cold_process); on a
2-core machine the process and the engine's thread compete for the cores, which hides it
(benchmarks/adapter_load.py --busy torch --process), so it is off by default
(EngineConfig.lora_load_process).

Here a child interpreter (``python -c``, so nothing of the caller's ``__main__`` runs again,
as it would under multiprocessing's spawn) resolves, validates and reads each adapter with the
thread's code (engine.lora.weights.load_adapter_weights over the layout's LayoutShapes),
building the staging buffer in a file in shared memory (/dev/shm). The engine's loader thread
maps that file, copies it into one pinned buffer (CUDA) or plain memory and removes it: a few
torch calls a load. Messages go over a socket pair as pickles of this package's own objects
(the spec, the buffer's views, the small extras); adapter files are read only in the child,
with the same weights-only rules. Refusals come back as the same LoRAError; if the child dies
(a crash in a reader), the load in flight fails with a LoRAError naming the adapter and the
next load starts a new child.
"""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from lorry.engine.errors import LoRAError


def staging_dirs() -> list[str]:
    """Where staging files go: shared memory first, the temp directory when it has no room
    (a container's /dev/shm is 64 MB unless its shm_size says more)."""
    out = [d for d in ("/dev/shm",) if os.path.isdir(d) and os.access(d, os.W_OK)]
    return out + [tempfile.gettempdir()]


class _Files:
    """The loader process's staging files (one a load; the engine removes each once read)."""

    def __init__(self, dirs: list[str] | None = None):
        self.dirs = dirs or staging_dirs()
        self.made: list[str] = []

    def alloc(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor over a new file of numel elements, its space reserved up front (a
        full tmpfs would otherwise kill the process with SIGBUS at the first write)."""
        nbytes = max(1, numel * torch.empty(0, dtype=dtype).element_size())
        for d in self.dirs:
            try:
                fd, path = tempfile.mkstemp(prefix="lorry-lora-", dir=d)
            except OSError:
                continue
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError:
                os.unlink(path)
                continue
            finally:
                os.close(fd)
            self.made.append(path)
            return torch.from_file(path, shared=True, size=numel, dtype=dtype)
        raise OSError(f"no room for a {nbytes}-byte staging file in {self.dirs}")

    def remove_all(self) -> None:
        for path in self.made:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.made.clear()


def _load(settings: dict, files: _Files, lora_path: str, revision: str | None,
          name: str) -> tuple:
    """In the loader process: LoRAManager._load's work up to the staging buffer."""
    from lorry.engine.lora.resolve import resolve_adapter_dir
    from lorry.engine.lora.spec import parse_adapter
    from lorry.engine.lora.weights import load_adapter_weights

    start, s = time.perf_counter(), settings
    try:
        path = resolve_adapter_dir(lora_path, revision=revision, roots=s["adapter_roots"])
        spec = parse_adapter(path, s["base_config"], max_lora_rank=s["max_lora_rank"],
                             base_model=s["base_name"])
        cap = s["max_full_copies"]
        if cap is not None and spec.full_copies > cap:
            raise LoRAError(f"adapter {name!r} ({lora_path}) has {spec.full_copies} full module "
                            f"copies (modules_to_save lm_head/embed_tokens); "
                            f"max_full_module_copies={cap} (LORRY_MAX_FULL_MODULE_COPIES) "
                            "allows fewer")
        w = load_adapter_weights(spec, s["base_config"], s["max_lora_rank"], s["dtype"],
                                 False, layout=s["layout"], alloc=files.alloc)
    except LoRAError:
        files.remove_all()
        raise
    except Exception as e:  # I/O, hub or torch errors: still this adapter's refusal  # noqa: BLE001
        files.remove_all()
        raise LoRAError(f"adapter {name!r} ({lora_path}) cannot be loaded: "
                        f"{type(e).__name__}: {e}") from None
    views = {f: tuple((tuple(t.shape), t.stride(), t.storage_offset()) for t in ab)
             for f, ab in w.staged.items()}
    numel = next((t.untyped_storage().nbytes() // t.element_size()
                  for ab in w.staged.values() for t in ab), 0)
    staged_file = files.made[-1] if files.made else None
    files.made.clear()   # the engine removes it once read
    return (spec, staged_file, numel, views, w.extras, w.nbytes,
            time.perf_counter() - start)


def serve() -> None:
    """The loader process: settings first, then (lora_path, revision, name) -> ("ok", result)
    or ("error", LoRAError) until the engine's end of the socket closes."""
    conn = Connection(int(sys.argv[1]))
    settings = pickle.loads(conn.recv_bytes())
    torch.set_num_threads(max(1, settings.pop("threads", 1)))
    files = _Files()
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break
        try:
            reply = ("ok", _load(settings, files, *msg))
        except LoRAError as e:
            reply = ("error", e)
        except BaseException as e:  # noqa: BLE001 (the engine reports it as this load's)
            files.remove_all()
            reply = ("error", LoRAError(f"adapter {msg[2]!r} ({msg[0]}) cannot be loaded: "
                                        f"{type(e).__name__}: {e}"))
        try:
            conn.send_bytes(pickle.dumps(reply))
        except (EOFError, OSError):
            if reply[0] == "ok" and reply[1][1]:
                files.made.append(reply[1][1])
            break
    files.remove_all()


class LoadProcess:
    """The loader process of one engine's LoRAManager (started at once; loads one at a time)."""

    def __init__(self, settings: dict):
        self._settings = settings
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self.restarts = 0
        self._closed = False
        self._start()

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(sys.modules["lorry"].__file__).parent.parent)   # where lorry is
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from lorry.engine.lora.load_process import serve; serve()",
             str(theirs.fileno())], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            env=env)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._conn.send_bytes(pickle.dumps(self._settings))

    def load(self, lora_path: str, revision: str | None, name: str) -> tuple:
        """(spec, staging tensor, views, extras, nbytes) of one adapter, read in the loader
        process (the staging tensor: its file mapped; copy it, then ``release`` it); raises
        LoRAError (its refusal, or the process's end while it loaded)."""
        with self._lock:
            if self._closed:
                raise LoRAError(f"adapter {name!r} ({lora_path}): the engine is closed")
            try:
                self._conn.send_bytes(pickle.dumps((lora_path, revision, name)))
                kind, value = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                self._restart()
                raise LoRAError(f"adapter {name!r} ({lora_path}) cannot be loaded: the "
                                "adapter loader process ended while reading it") from None
        if kind == "error":
            raise value
        spec, path, numel, views, extras, nbytes, _seconds = value
        if path is None:
            src = torch.empty(0, dtype=self._settings["dtype"])
        else:
            try:
                src = torch.from_file(path, shared=False, size=numel,
                                      dtype=self._settings["dtype"])
            finally:
                os.unlink(path)   # the mapping stays until src goes
        return spec, src, views, extras, nbytes

    def _restart(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
        self._conn.close()
        self.restarts += 1
        self._start()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._conn.close()   # the child's recv ends: it removes its files and exits
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass
