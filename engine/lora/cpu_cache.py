"""CPU LRU cache of loaded adapters (max_cpu_loras), keyed by lora_int_id, with pinning."""
from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from lorry.engine.lora.request import LoRARequest
from lorry.engine.lora.weights import AdapterWeights


class CPUAdapterCache:
    """Least-recently-used adapters in host memory (pinned memory on CUDA).

    ``loader`` validates and reads an adapter; it raises LoRAError before anything is cached.
    """

    def __init__(self, capacity: int, loader: Callable[[LoRARequest], AdapterWeights]):
        self.capacity = capacity
        self._loader = loader
        self._entries: OrderedDict[int, tuple[LoRARequest, AdapterWeights]] = OrderedDict()
        self.pinned: set[int] = set()
        self.hits = self.misses = self.evictions = 0
        self.load_seconds = 0.0

    def __contains__(self, lora_id: int) -> bool:
        return lora_id in self._entries

    def ids(self) -> list[int]:
        """Resident adapter ids, least recently used first."""
        return list(self._entries)

    def get(self, request: LoRARequest) -> AdapterWeights:
        """Return the adapter's weights, loading (and evicting the LRU unpinned one) on a miss."""
        entry = self._entries.get(request.lora_int_id)
        if entry is not None and entry[0].lora_path == request.lora_path \
                and entry[0].revision == request.revision:
            self.hits += 1
            self._entries.move_to_end(request.lora_int_id)
            return entry[1]
        start = time.perf_counter()
        weights = self._loader(request)  # raises before the cache changes
        self.load_seconds += time.perf_counter() - start
        self.misses += 1
        self._entries.pop(request.lora_int_id, None)
        self._entries[request.lora_int_id] = (request, weights)
        self._evict_over_capacity()
        return weights

    def peek(self, request: LoRARequest) -> AdapterWeights | None:
        """The cached weights of exactly this request (same path/revision), without touching
        the LRU order or the counters."""
        entry = self._entries.get(request.lora_int_id)
        if entry is not None and entry[0].lora_path == request.lora_path \
                and entry[0].revision == request.revision:
            return entry[1]
        return None

    def put(self, request: LoRARequest, weights: AdapterWeights, seconds: float) -> None:
        """Insert weights loaded elsewhere (a background load): counted as a miss."""
        self.load_seconds += seconds
        self.misses += 1
        self._entries.pop(request.lora_int_id, None)
        self._entries[request.lora_int_id] = (request, weights)
        self._evict_over_capacity()

    def request(self, lora_id: int) -> LoRARequest | None:
        entry = self._entries.get(lora_id)
        return entry[0] if entry else None

    def _evict_over_capacity(self) -> None:
        while len(self._entries) > self.capacity:
            victim = next((i for i in self._entries if i not in self.pinned), None)
            if victim is None:  # everything pinned: stay over capacity rather than drop a pin
                return
            del self._entries[victim]
            self.evictions += 1

    def remove(self, lora_id: int) -> bool:
        self.pinned.discard(lora_id)
        return self._entries.pop(lora_id, None) is not None

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "residents": len(self._entries), "capacity": self.capacity,
                "pinned": sorted(self.pinned), "load_seconds": round(self.load_seconds, 6),
                "bytes": sum(w.nbytes for _, w in self._entries.values())}
