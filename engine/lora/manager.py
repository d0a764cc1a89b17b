"""LoRAManager: validation, the CPU LRU cache and the GPU slots of one engine, together."""
from __future__ import annotations

import torch

from engine.errors import LoRAError
from engine.lora.cpu_cache import CPUAdapterCache
from engine.lora.gpu_slots import GPUSlotManager
from engine.lora.request import LoRARequest
from engine.lora.resolve import ADAPTER_FILES, resolve_dir
from engine.lora.spec import parse_adapter
from engine.lora.weights import AdapterWeights, load_adapter_weights


class LoRAManager:
    def __init__(self, model, base_config: dict, base_name: str, *, max_loras: int,
                 max_lora_rank: int, max_cpu_loras: int, dtype: torch.dtype,
                 device: torch.device):
        self.base_config, self.base_name = base_config, base_name
        self.max_lora_rank, self.dtype = max_lora_rank, dtype
        self.pin_memory = device.type == "cuda"
        self.gpu = GPUSlotManager(model, max_loras, max_lora_rank, dtype, device)
        self.cpu = CPUAdapterCache(max_cpu_loras, self._load)
        self.known: dict[int, LoRARequest] = {}  # every adapter added and not removed

    def _load(self, request: LoRARequest) -> AdapterWeights:
        """Resolve, validate (torch-free spec) and read an adapter; raises LoRAError."""
        path = resolve_dir(request.lora_path, revision=request.revision,
                           allow_patterns=ADAPTER_FILES, what="adapter")
        spec = parse_adapter(path, self.base_config, max_lora_rank=self.max_lora_rank,
                             base_model=self.base_name)
        return load_adapter_weights(spec, self.base_config, self.max_lora_rank, self.dtype,
                                    self.pin_memory)

    def add(self, request: LoRARequest) -> AdapterWeights:
        """Validate and load into the CPU cache (a hit if already there)."""
        weights = self.cpu.get(request)
        self.known[request.lora_int_id] = request
        return weights

    def activate(self, request: LoRARequest, protected: set[int]) -> int:
        """Put the adapter in a GPU slot (loading it into the CPU cache if evicted there)."""
        slot = self.gpu.lookup(request.lora_int_id)
        if slot is not None:
            self.gpu.hits += 1
            self.gpu.slot_of.move_to_end(request.lora_int_id)
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
        a, b = self.gpu.remove(lora_id), self.cpu.remove(lora_id)
        return a or b

    def stats(self) -> dict:
        return {"gpu": self.gpu.stats(), "cpu": self.cpu.stats()}
