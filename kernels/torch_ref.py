"""Pure-torch reference for multi-adapter LoRA shrink/expand (the CPU backend).

Semantics shared with the Triton kernels (kernels/triton_lora.py):
  shrink: out[s, t, :] = x[t] @ A_s[slot(t)].T            for tokens with slot >= 0
  expand: y[t, off_s:off_s+N_s] += out[s, t] @ B_s[slot(t)].T  for tokens with slot >= 0
The adapter's scaling (alpha / r or alpha / sqrt(r)) is folded into B when the adapter is
written into its GPU slot, and smaller ranks are zero-padded to the slot width R, so the
padding contributes exactly zero. With row buffers (LoRAMeta.rows: slot memory shared by
rank, kernels.slot_args) a slot's A and B are its adapter's rows, as many as its rank.
"""
from __future__ import annotations

import torch

from lorry.kernels.segments import LoRAMeta


def _slot_groups(meta: LoRAMeta):
    """Yield (slot, token_index_tensor) for every slot that has tokens (host side)."""
    slots = meta.token_slots
    for slot in torch.unique(slots).tolist():
        if slot >= 0:
            yield slot, torch.nonzero(slots == slot, as_tuple=True)[0]


def slot_a(a: torch.Tensor, meta: LoRAMeta, slot: int) -> torch.Tensor:
    """[r, H]: the A rows of ``slot`` (r = R for per-slot stacks, its rank for row buffers)."""
    if meta.rows is None:
        return a[slot]
    base, rank = meta.rows.table[:, slot].tolist()
    return a[base:base + rank]


def slot_b(b: torch.Tensor, meta: LoRAMeta, slot: int) -> torch.Tensor:
    """[N, r]: the B columns of ``slot``."""
    if meta.rows is None:
        return b[slot]
    base, rank = meta.rows.table[:, slot].tolist()
    return b[:, base:base + rank]


def lora_shrink(x: torch.Tensor, lora_a: list[torch.Tensor], meta: LoRAMeta,
                out: torch.Tensor) -> None:
    """x: [T, H]; lora_a[s]: [L, R, H] (or [rows, H]); out: [S, T, R] (written for tokens
    with an adapter; with row buffers, zero past the slot's rank)."""
    for slot, idx in _slot_groups(meta):
        xs = x.index_select(0, idx)
        for s, a in enumerate(lora_a):
            w = slot_a(a, meta, slot)
            prod = torch.zeros(len(idx), out.shape[-1], dtype=out.dtype, device=out.device)
            prod[:, :w.shape[0]] = (xs @ w.t()).to(out.dtype)
            out[s].index_copy_(0, idx, prod)


def lora_expand(inter: torch.Tensor, lora_b: list[torch.Tensor], meta: LoRAMeta,
                y: torch.Tensor, slice_offsets: list[int]) -> None:
    """inter: [S, T, R]; lora_b[s]: [L, N_s, R] (or [N_s, rows]); y: [T, sum N_s],
    accumulated in place."""
    for slot, idx in _slot_groups(meta):
        for s, b in enumerate(lora_b):
            w = slot_b(b, meta, slot)
            off, n = slice_offsets[s], w.shape[0]
            delta = inter[s].index_select(0, idx)[:, :w.shape[1]].to(b.dtype) @ w.t()
            y[:, off:off + n].index_add_(0, idx, delta.to(y.dtype))


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor],
             lora_b: list[torch.Tensor], meta: LoRAMeta, slice_offsets: list[int],
             buffer: torch.Tensor | None = None) -> None:
    """y[:, slices] += LoRA(x) for every token with an adapter. x: [T, H], y: [T, N]."""
    R = meta.rows.max_rank if meta.rows is not None else lora_a[0].shape[1]
    if buffer is None:
        buffer = torch.zeros(len(lora_a), x.shape[0], R, dtype=torch.float32, device=x.device)
    lora_shrink(x, lora_a, meta, buffer)
    lora_expand(buffer, lora_b, meta, y, slice_offsets)
