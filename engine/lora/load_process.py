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

Here a child interpreter (``python -I -c`` with the engine's sys.path, so nothing of the
caller's ``__main__`` runs again, as it would under multiprocessing's spawn) resolves,
validates and reads each adapter with the thread's code (engine.lora.weights.read_adapter
over the layout's LayoutShapes), building the staging buffer in a file in shared memory
(/dev/shm). The engine's loader thread maps that file, copies it into one pinned buffer
(CUDA) or plain memory and removes it: a few torch calls a load; the extras (bias terms,
DoRA magnitudes, heads, embeddings) travel in a second file. Messages go over a socket pair
as pickles of this package's own objects (the spec, the buffers' views); adapter files are
read only in the child, with the same weights-only rules. Refusals come back as the same
LoRAError; if the child dies (a crash in a reader), the load in flight fails with a
LoRAError naming the adapter and the next load starts a new child.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection

import torch

from lorry.engine.errors import LoRAError


def staging_dirs() -> list[str]:
    """Where staging files go: shared memory first, the temp directory when it has no room
    (a container's /dev/shm is 64 MB unless its shm_size says more)."""
    out = [d for d in ("/dev/shm",) if os.path.isdir(d) and os.access(d, os.W_OK)]
    return out + [tempfile.gettempdir()]


class _Files:
    """The loader process's staging files, in directories of its engine's own (the engine
    removes each file once read, and the directories with whatever is left when the process
    ends or is replaced)."""

    def __init__(self, dirs: list[str]):
        self.dirs = dirs
        self.made: list[str] = []

    def alloc(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-D tensor of zeros over a new file of numel elements, its space reserved up
        front (a full tmpfs would otherwise kill the process with SIGBUS at the first write)."""
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


def _extras_to_file(extras, files: _Files):
    """The extras' tensors written one after another (64-byte aligned) into one staging file:
    (the extras with each tensor replaced by (dtype name, shape, byte offset), the file or
    None). A full lm_head is ~1 GB: no pickle carries it."""
    tensors = [t.detach().contiguous() for t in extras.tensors()]
    if not tensors:
        return extras, None
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // 64) * 64
    buf = files.alloc(total, torch.uint8)
    for t, off in zip(tensors, offsets):
        if t.numel():
            buf[off:off + t.numel() * t.element_size()].copy_(t.view(-1).view(torch.uint8))
    meta = iter((str(t.dtype).removeprefix("torch."), tuple(t.shape), off)
                for t, off in zip(tensors, offsets))
    return extras.map(lambda _t: next(meta)), files.made[-1]


def _extras_from_file(extras, path: str | None):
    """The extras back from ``_extras_to_file``'s file (copies; the file is removed)."""
    if path is None:
        return extras
    try:
        src = torch.from_file(path, shared=False, size=os.path.getsize(path),
                              dtype=torch.uint8)
    finally:
        os.unlink(path)

    def tensor(meta):
        dtype, shape, off = meta
        dt = getattr(torch, dtype)
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dt).element_size()
        return src[off:off + n].view(dt).reshape(shape).clone()
    return extras.map(tensor)


def _load(settings: dict, files: _Files, lora_path: str, revision: str | None,
          name: str, roots: tuple[str, ...] | None = None) -> tuple:
    """In the loader process: LoRAManager._load's work up to the staging buffer."""
    from lorry.engine.lora.weights import read_adapter

    try:
        w = read_adapter(lora_path, revision, name, settings, False, settings["layout"],
                         files.alloc, roots=roots)
        extras, extras_file = _extras_to_file(w.extras, files)
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
    staged_file = files.made[0]   # stage() made it first (1 byte when nothing is staged)
    files.made.clear()   # the engine removes them once read
    return w.spec, staged_file, numel, views, (extras, extras_file), w.nbytes


def serve() -> None:
    """The loader process (argv: the socket's fd, the settings file): requests (lora_path,
    revision, name) answered ("ok", result) or ("error", LoRAError) until the engine's end
    of the socket closes."""
    conn = Connection(int(sys.argv[1]))
    with open(sys.argv[2], "rb") as f:
        settings = pickle.load(f)
    torch.set_num_threads(max(1, settings.pop("threads", 1)))
    files = _Files(settings["staging_dirs"])
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            break
        try:
            reply = ("ok", _load(settings, files, *msg))
        except LoRAError as e:
            reply = ("error", e)
        except Exception as e:  # noqa: BLE001 (the engine reports it as this load's)
            files.remove_all()
            reply = ("error", LoRAError(f"adapter {msg[2]!r} ({msg[0]}) cannot be loaded: "
                                        f"{type(e).__name__}: {e}"))
        try:
            conn.send_bytes(pickle.dumps(reply))
        except (EOFError, OSError):
            break
    files.remove_all()


# The loader process's program: the engine's sys.path (argv[3], JSON) and nothing else, so the
# child imports what the engine imports; run isolated (-I: no current directory, no PYTHON*
# variables). Tests swap it for one with a hook.
CHILD = ("import json, sys; sys.path[:] = json.loads(sys.argv[3]); "
         "from lorry.engine.lora.load_process import serve; serve()")


class LoadProcess:
    """The loader process of one engine's LoRAManager (started at once; loads one at a time).

    Pickles cross between this process and its child only (this package's own objects:
    the spec, the buffers' views; tensors travel in the staging files, never in a pickle);
    adapter files are read in the child, with the same weights-only rules as in a thread."""

    def __init__(self, settings: dict):
        self._settings = settings
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._dirs: list[str] = []
        self.restarts = 0
        self._closed = False
        self._start()

    def _start(self) -> None:
        self._dirs = []
        for d in staging_dirs():
            try:
                self._dirs.append(tempfile.mkdtemp(prefix="lorry-lora-", dir=d))
            except OSError:
                continue
        settings_file = os.path.join(self._dirs[-1], "settings.pickle")
        with open(settings_file, "wb") as f:   # read by the child as it starts: no wait here
            pickle.dump({**self._settings, "staging_dirs": self._dirs,
                         "pin_dir": self._dirs[0]}, f)
        ours, theirs = socket.socketpair()
        # a session of its own: a Ctrl-C meant for the engine's process does not end a load
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-c", CHILD, str(theirs.fileno()), settings_file,
             json.dumps(sys.path)], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            start_new_session=True)
        theirs.close()
        self._conn = Connection(ours.detach())

    def load(self, lora_path: str, revision: str | None, name: str,
             roots: tuple[str, ...] | None = None) -> tuple:
        """(spec, staging tensor, views, extras, nbytes) of one adapter, read in the loader
        process (the staging tensor maps its file, already removed); raises LoRAError (its
        refusal, or the process's end while it loaded)."""
        with self._lock:
            if self._closed:
                raise LoRAError(f"adapter {name!r} ({lora_path}): the engine is closed")
            if self._proc.poll() is not None:   # it ended while idle: a new one serves
                self._restart()
            try:
                self._conn.send_bytes(pickle.dumps((lora_path, revision, name, roots)))
                kind, value = pickle.loads(self._conn.recv_bytes())
            except Exception:   # noqa: BLE001 (its end, or a message out of step)
                if self._closed:
                    raise LoRAError(f"adapter {name!r} ({lora_path}): the engine is "
                                    "closed") from None
                code = self._restart()
                raise LoRAError(f"adapter {name!r} ({lora_path}) cannot be loaded: the "
                                f"adapter loader process ended (exit code {code}) while "
                                "reading it") from None
        if kind == "error":
            raise value
        spec, path, numel, views, (extras, extras_file), nbytes = value
        extras = _extras_from_file(extras, extras_file)
        dtype = self._settings["dtype"]
        try:
            src = (torch.from_file(path, shared=False, size=numel, dtype=dtype) if numel
                   else torch.empty(0, dtype=dtype))
        finally:
            os.unlink(path)   # the mapping stays until src goes
        return spec, src, views, extras, nbytes

    def _end_child(self) -> int | None:
        """Stop the child (if running) and remove its directories; its exit code."""
        proc = self._proc
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        self._conn.close()
        for d in self._dirs:
            shutil.rmtree(d, ignore_errors=True)
        return code

    def _restart(self) -> int | None:
        code = self._end_child()
        if not self._closed:
            self.restarts += 1
            self._start()
        return code

    def close(self) -> None:
        """End the loader process: at once if a load is in flight (that load fails), else
        after it has seen the socket close (up to 10 s)."""
        if self._closed:
            return
        self._closed = True
        if self._lock.acquire(timeout=0.2):   # idle
            try:
                self._conn.close()   # the child's recv ends: it exits
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                self._end_child()
            finally:
                self._lock.release()
        else:   # a load in flight (perhaps hung): kill it, the load's recv then fails
            self._proc.kill()
            with self._lock:
                self._end_child()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown)
            pass
