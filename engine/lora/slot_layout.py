"""Slot layout: one buffer per (fused module kind, A|B), slot-major, so a swap is a few copies.

For a fused kind (e.g. qkv_proj with slices q/k/v) the GPU holds
  A: [max_loras, num_layers, num_slices, R, in]   and   B: [max_loras, num_layers, sum N_s, R]
and each layer's ``mod.lora_a[s]`` / ``mod.lora_b[s]`` is a strided view into them. One slot's
data for a kind is contiguous, and an adapter's pinned CPU staging buffer has exactly that
layout (zero-padded to R), so writing an adapter into a slot is one copy per kind and matrix.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


@dataclass
class Family:
    """One fused module kind over the layers that have it."""

    name: str                 # fused module name, e.g. "qkv_proj"
    layers: list[int]         # model layer indices, in order
    slice_names: list[str]    # checkpoint module names, e.g. ["q_proj", "k_proj", "v_proj"]
    slice_sizes: list[int]    # output width of each slice
    in_features: int

    @property
    def slice_offsets(self) -> list[int]:
        return [sum(self.slice_sizes[:i]) for i in range(len(self.slice_sizes))]

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (len(self.layers), len(self.slice_names), rank, self.in_features)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (len(self.layers), sum(self.slice_sizes), rank)


class SlotLayout:
    """The families of a model's LoRA layers and where each (layer, module) lives in them."""

    def __init__(self, model, rank: int):
        self.rank = rank
        # Pinned-memory allocation is a CUDA call: from a loader thread it would invalidate a
        # CUDA graph being captured (global capture mode). Captures hold this lock too.
        self.pin_lock = threading.Lock()
        self.families: dict[str, Family] = {}
        self.modules = {}   # (family name, layer) -> LoRALinear
        for layer, name, mod in model.lora_layers():
            fam = self.families.get(name)
            if fam is None:
                fam = self.families[name] = Family(name, [], list(mod.slice_names),
                                                   list(mod.slice_sizes), mod.in_features)
            elif (fam.slice_names, fam.slice_sizes, fam.in_features) != \
                    (list(mod.slice_names), list(mod.slice_sizes), mod.in_features):
                raise ValueError(f"layer {layer} {name}: slices {mod.slice_names} "
                                 f"{mod.slice_sizes} x {mod.in_features} differ from layer "
                                 f"{fam.layers[0]}'s; the slot layout needs uniform layers")
            fam.layers.append(layer)
            self.modules[(name, layer)] = mod
        # checkpoint module name -> (family name, slice index)
        self.slice_of = {m: (f.name, i) for f in self.families.values()
                         for i, m in enumerate(f.slice_names)}
        self.layer_pos = {f.name: {lay: p for p, lay in enumerate(f.layers)}
                          for f in self.families.values()}

    def numel(self, family: str) -> tuple[int, int]:
        """Elements of one slot's A and B for ``family``."""
        f = self.families[family]
        return (_prod(f.a_shape(self.rank)), _prod(f.b_shape(self.rank)))

    def stage(self, modules: dict, dtype: torch.dtype, pin_memory: bool) -> dict:
        """Build the staging buffers of one adapter.

        ``modules``: (layer, checkpoint module) -> (A [r, in], B*scaling [out, r]) float tensors.
        Returns {family: (A [num_layers, S, R, in], B [num_layers, N, R])} for the families the
        adapter touches, in one (pinned) allocation, zero where the adapter has no weights.
        """
        touched = sorted({self.slice_of[m][0] for _, m in modules})
        sizes = [n for f in touched for n in self.numel(f)]
        with self.pin_lock:
            flat = torch.empty(sum(sizes), dtype=dtype, pin_memory=pin_memory)
        flat.zero_()  # plain host memory work, outside the lock
        out, start = {}, 0
        for f in touched:
            fam = self.families[f]
            na, nb = self.numel(f)
            a = flat[start:start + na].view(fam.a_shape(self.rank))
            b = flat[start + na:start + na + nb].view(fam.b_shape(self.rank))
            start += na + nb
            out[f] = (a, b)
        for (layer, m), (a, b) in modules.items():
            f, s = self.slice_of[m]
            fam = self.families[f]
            p = self.layer_pos[f][layer]
            r, off = a.shape[0], fam.slice_offsets[s]
            out[f][0][p, s, :r].copy_(a)
            out[f][1][p, off:off + fam.slice_sizes[s], :r].copy_(b)
        return out

    def allocate(self, max_loras: int, dtype: torch.dtype, device: torch.device) -> dict:
        """The GPU slot buffers {family: (A, B)} and each layer's lora_a/lora_b views into them."""
        bufs = {}
        for f, fam in self.families.items():
            a = torch.zeros((max_loras, *fam.a_shape(self.rank)), dtype=dtype, device=device)
            b = torch.zeros((max_loras, *fam.b_shape(self.rank)), dtype=dtype, device=device)
            bufs[f] = (a, b)
            for p, layer in enumerate(fam.layers):
                mod = self.modules[(f, layer)]
                mod.lora_a = [a[:, p, s] for s in range(len(fam.slice_names))]       # [L, R, in]
                mod.lora_b = [b[:, p, o:o + n] for o, n in zip(fam.slice_offsets, fam.slice_sizes)]
        return bufs


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
