"""LoRAManager: validation, the CPU LRU cache and the GPU slots of one engine, together.

Disk -> CPU loads (resolve, validate, read, build the pinned staging buffer) can run in one
background thread (``prefetch``/``poll``), so the engine keeps stepping while a cold adapter
loads; the cache itself is only changed on the engine's thread. With ``load_process`` the
thread hands the reading to a process of its own (engine.lora.load_process) and only copies
the staging buffer it returns into pinned memory, so a load takes nothing of the GIL's time.

With ``max_full_module_copies``, adapters holding full trained matrices (lm_head/embed_tokens via
modules_to_save) are admitted only while the copies of the running and pinned adapters leave room
(``ready``): a request waits for running rows to finish, and fails with a LoRAError when pinned
adapters alone (or the adapter itself) exceed the limit.
"""
from __future__ import annotations

import concurrent.futures as cf
import sys
import threading
import time

import torch

from lorry.engine.errors import LoRAError
from lorry.engine.lora.cpu_cache import CPUAdapterCache
from lorry.engine.lora.gpu_slots import GPUSlotManager, adapter_rank
from lorry.engine.lora.pinned_reserve import reserve, staging_bytes
from lorry.engine.lora.request import LoRARequest
from lorry.engine.lora.weights import AdapterWeights, read_adapter, rehome

# While adapters load in the background, the engine's thread hands the GIL over every this
# many seconds instead of Python's 5 ms: each torch call of a load gives the GIL up and must
# take it back, and beside a thread issuing a step it waited up to the whole interval each
# time (benchmarks/adapter_load.py: a load 0.7-1.0 s beside a thread busy in Python at 5 ms,
# 0.17-0.19 s at 1 ms). Only while loads run, in any engine of the process: the interval is
# lowered when the first starts and put back when the last ends (by the loader thread, so an
# abandoned or removed load does not leave it lowered), unless something else changed it.
LOAD_SWITCH_INTERVAL = 0.001
_loads = {"running": 0, "saved": None}
_loads_lock = threading.Lock()


def _load_started() -> None:
    with _loads_lock:
        _loads["running"] += 1
        if _loads["running"] == 1 and sys.getswitchinterval() > LOAD_SWITCH_INTERVAL:
            _loads["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(LOAD_SWITCH_INTERVAL)


def _load_ended(_future=None) -> None:
    with _loads_lock:
        _loads["running"] -= 1
        saved = _loads["saved"]
        if _loads["running"] == 0 and saved is not None:
            _loads["saved"] = None
            if sys.getswitchinterval() == LOAD_SWITCH_INTERVAL:   # still ours
                sys.setswitchinterval(saved)


class LoRAManager:
    def __init__(self, model, base_config: dict, base_name: str, *, max_loras: int,
                 max_lora_rank: int, max_cpu_loras: int, dtype: torch.dtype,
                 device: torch.device, fold: bool = False,
                 adapter_roots: tuple[str, ...] | None = None,
                 max_full_module_copies: int | None = None, memory_slots: int | None = None,
                 load_process: bool = False, pinned_reserve_mb: int | None = None):
        self.pin_memory = device.type == "cuda"
        self.gpu = GPUSlotManager(model, max_loras, max_lora_rank, dtype, device, fold=fold,
                                  max_full_copies=max_full_module_copies,
                                  memory_slots=memory_slots)
        self.pinned_reserve = None   # engine.lora.pinned_reserve's decision (CUDA)
        if self.pin_memory:   # before any staging buffer is pinned
            self.pinned_reserve = reserve(pinned_reserve_mb, adapters=max_cpu_loras,
                                          one_bytes=staging_bytes(self.gpu.layout,
                                                                  max_lora_rank, dtype))
        # callable -> ids of the adapters of running rows (set by the engine: Scheduler's)
        self.running_adapters = None
        self.full_copies_of = self.gpu.copies_needed  # lora id -> its full copies (when loaded)
        self.cpu = CPUAdapterCache(max_cpu_loras, self._load)
        self.known: dict[int, LoRARequest] = {}  # every adapter added and not removed
        self._pool: cf.ThreadPoolExecutor | None = None
        # lora id -> (request, future of (weights, seconds)) of loads in the background
        self.pending: dict[int, tuple[LoRARequest, cf.Future]] = {}
        self.background_loads = 0
        self._unreported: list[tuple[LoRARequest, LoRAError]] = []
        # what a load needs besides the request (engine.lora.weights.read_adapter);
        # adapter_roots None: local adapters may be anywhere
        self._read = {"adapter_roots": adapter_roots, "base_config": base_config,
                      "base_name": base_name, "max_lora_rank": max_lora_rank, "dtype": dtype,
                      "max_full_copies": self.gpu.max_full_copies}
        self.process = None   # engine.lora.load_process.LoadProcess: background loads' reader
        if load_process:
            from lorry.engine.lora.load_process import LoadProcess

            self.process = LoadProcess({**self._read, "layout": self.gpu.layout.shapes(),
                                        "threads": min(4, torch.get_num_threads())})

    def _load(self, request: LoRARequest) -> AdapterWeights:
        """Resolve (inside the allowed roots), validate (torch-free spec) and read an adapter;
        raises LoRAError."""
        return self._loaded(request, read_adapter(
            request.lora_path, request.revision, request.lora_name, self._read,
            self.pin_memory, self.gpu.layout, roots=request.roots))

    def _loaded(self, request: LoRARequest, weights: AdapterWeights) -> AdapterWeights:
        self.full_copies_of[request.lora_int_id] = weights.spec.full_copies
        # the scheduler's planner sizes the adapter's block by it from now on
        self.gpu.rank_of[request.lora_int_id] = adapter_rank(weights)
        return weights

    def _load_elsewhere(self, request: LoRARequest) -> AdapterWeights:
        """``_load`` with the reading done in the loader process; here only the copy of the
        staging buffer it made into this process's (pinned) memory."""
        spec, src, views, extras, nbytes = self.process.load(
            request.lora_path, request.revision, request.lora_name, request.roots)
        return self._loaded(request, rehome(spec, self.gpu.layout, src, views, extras, nbytes,
                                            self.pin_memory))

    def _timed_load(self, request: LoRARequest, elsewhere: bool = False):
        start = time.perf_counter()
        try:
            weights = self._load_elsewhere(request) if elsewhere else self._load(request)
        except LoRAError:
            raise
        except Exception as e:  # I/O, hub or torch errors: still this adapter's refusal
            raise LoRAError(f"adapter {request.lora_name!r} ({request.lora_path}) cannot be "
                            f"loaded: {type(e).__name__}: {e}") from e
        return weights, time.perf_counter() - start

    # ---- background loads -----------------------------------------------------------------
    def _cached(self, request: LoRARequest) -> bool:
        """Usable without a disk load: in a GPU slot, or in the CPU cache."""
        if self.gpu.lookup(request.lora_int_id) is not None \
                and _same(self.known.get(request.lora_int_id), request):
            return True
        return self.cpu.peek(request) is not None

    def ready(self, request: LoRARequest) -> bool:
        """Usable now: loaded (GPU slot or CPU cache) and, under max_full_module_copies, its
        full copies fit next to those of the running and pinned adapters."""
        return self._cached(request) and self._copies_fit(request)

    def _copies_fit(self, request: LoRARequest) -> bool:
        cap, lid = self.gpu.max_full_copies, request.lora_int_id
        need = self.full_copies_of.get(lid, 0)
        if cap is None or not need:
            return True
        pinned = self.gpu.pinned - {lid}
        held = sum(self.full_copies_of.get(i, 0) for i in pinned)
        if held + need > cap:  # never frees up by itself: fail the waiting requests
            self._unreported.append((request, LoRAError(
                f"adapter {request.lora_name!r} cannot run: it has {need} full module "
                f"cop{'ies' if need > 1 else 'y'} (modules_to_save lm_head/embed_tokens) and "
                f"pinned adapters hold {held} of max_full_module_copies={cap} "
                "(LORRY_MAX_FULL_MODULE_COPIES); unpin one or raise the limit")))
            return False
        running = set(self.running_adapters()) if self.running_adapters else set()
        held = sum(self.full_copies_of.get(i, 0) for i in (running | pinned) - {lid})
        return held + need <= cap  # else it waits until running rows release copies

    def prefetch(self, request: LoRARequest) -> None:
        """Start loading ``request`` into the CPU cache in the background (if not there)."""
        if self._cached(request):
            return
        running = self.pending.get(request.lora_int_id)
        if running is not None and _same(running[0], request):
            return
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorry-lora")
        _load_started()
        try:
            fut = self._pool.submit(self._timed_load, request, self.process is not None)
        except BaseException:
            _load_ended()
            raise
        fut.add_done_callback(_load_ended)   # also when cancelled by close()
        self.pending[request.lora_int_id] = (request, fut)
        self.background_loads += 1

    def loading(self) -> bool:
        return bool(self.pending)

    def poll(self) -> list[tuple[LoRARequest, LoRAError]]:
        """Move finished background loads into the CPU cache; return the failed ones."""
        failed, self._unreported = self._unreported, []
        for lid, (request, fut) in list(self.pending.items()):
            if not fut.done():
                continue
            del self.pending[lid]
            try:
                weights, seconds = fut.result()
            except LoRAError as e:
                failed.append((request, e))
                continue
            self.cpu.put(request, weights, seconds)
            self.known[lid] = request
        return failed

    def wait_any(self, timeout: float) -> None:
        """Block until a background load finishes (or ``timeout`` seconds)."""
        if self.pending:
            cf.wait([f for _, f in self.pending.values()], timeout=timeout,
                    return_when=cf.FIRST_COMPLETED)

    def close(self) -> None:
        if self.process is not None:   # first: a load in flight there ends now
            self.process.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # ---- synchronous API ------------------------------------------------------------------
    def add(self, request: LoRARequest) -> AdapterWeights:
        """Validate and load into the CPU cache (a hit if already there); raises LoRAError."""
        running = self.pending.get(request.lora_int_id)
        if running is not None and _same(running[0], request):
            cf.wait([running[1]])
            for req, err in self.poll():
                if _same(req, request):
                    raise err
                self._unreported.append((req, err))  # the engine's next poll reports them
        weights = self.cpu.get(request)
        self.known[request.lora_int_id] = request
        return weights

    def activate(self, request: LoRARequest, protected: set[int]) -> int:
        """Put the adapter in a GPU slot (loading it into the CPU cache if evicted there)."""
        slot = self.gpu.lookup(request.lora_int_id)
        if slot is not None:
            self.gpu.hits += 1
            self.gpu.slot_of.move_to_end(request.lora_int_id)
            if request.lora_int_id in self.cpu:
                self.cpu.get(request)  # keep its CPU entry recent too
            return slot
        return self.gpu.activate(request.lora_int_id, self.cpu.get(request), protected)

    def pin(self, lora_id: int, protected: set[int]) -> None:
        request = self.known.get(lora_id)
        if request is None:
            raise LoRAError(f"cannot pin adapter {lora_id}: it is not loaded; call add_lora first")
        if lora_id not in self.gpu.pinned and len(self.gpu.pinned) >= self.gpu.capacity:
            raise LoRAError(f"cannot pin adapter {lora_id}: all max_loras={self.gpu.capacity} "
                            f"GPU slots are pinned already ({sorted(self.gpu.pinned)})")
        if self.gpu.lookup(lora_id) is None and lora_id in self.gpu.rank_of \
                and not self.gpu.block_free(protected, lora_id):
            raise LoRAError(f"cannot pin adapter {lora_id}: running and pinned adapters hold "
                            f"the LoRA slot memory its rank needs "
                            f"({self.gpu.pages_for(lora_id) * self.gpu.page} of "
                            f"{self.gpu.num_rows} rows); retry when they finish or unpin one")
        self.activate(request, protected | self.gpu.pinned)
        self.gpu.pinned.add(lora_id)
        self.cpu.pinned.add(lora_id)

    def unpin(self, lora_id: int) -> bool:
        was = lora_id in self.gpu.pinned
        self.gpu.pinned.discard(lora_id)
        self.cpu.pinned.discard(lora_id)
        return was

    def remove(self, lora_id: int) -> bool:
        self.known.pop(lora_id, None)
        self.full_copies_of.pop(lora_id, None)
        self.gpu.rank_of.pop(lora_id, None)
        self.pending.pop(lora_id, None)  # a load in flight is dropped when it ends
        a, b = self.gpu.remove(lora_id), self.cpu.remove(lora_id)
        return a or b

    def stats(self) -> dict:
        cpu = self.cpu.stats()
        cpu["loading"] = len(self.pending)
        if self.pinned_reserve is not None:
            cpu["pinned_reserve"] = dict(self.pinned_reserve)
        return {"gpu": self.gpu.stats(), "cpu": cpu,
                "full_copy_bytes": self.gpu.full_copy_bytes}


def _same(a: LoRARequest | None, b: LoRARequest) -> bool:
    """The same adapter files (the caches key by id; path and revision must match too)."""
    return a is not None and (a.lora_path, a.revision) == (b.lora_path, b.revision)
