"""Vectorised torch LoRA ops for the CPU (backend "torch"): kernels.torch_ref's contract, no loops.

Each token's adapter is selected by a one-hot mask over the stacked slots, so a step costs one
shrink matmul per fused layer (every slice's A side by side) and one expand matmul per slice,
inner size max_loras * R (small on CPU: e.g. 4 * 8), and no host sync or per-slot Python loop.
kernels.torch_ref stays the plain reference they are tested on.

The slot buffers are strided views (lorry.engine.lora.slot_layout), so ``add_lora`` keeps a
contiguous packed copy of a layer's A and B on its first A tensor and reuses it every step
until ``invalidate`` drops it (the slot manager calls it whenever it writes a slot). On a
decode step of a small model this halves the CPU cost of LoRA: ops, not FLOPs, dominate there.

Row buffers (LoRAMeta.rows: slot memory shared by rank, kernels.slot_args) take the same
matmuls with the buffers' rows as the inner size, each token's mask covering its adapter's rows.
"""
from __future__ import annotations

import torch

from lorry.kernels.segments import LoRAMeta
from lorry.kernels.slot_args import check_layout


# The masks select with torch.where, not a product: every token is multiplied with every
# slot's weights, and another adapter's product that overflows (inf in fp16) times a 0 mask
# would be NaN in this token's row.


def _keep(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """t where mask holds, 0 elsewhere (whatever t holds there)."""
    return torch.where(mask, t, 0.0)


def _selector(meta: LoRAMeta, L: int, R: int) -> torch.Tensor:
    """[T, L*R] bool mask: the R columns of the token's slot (none for slot -1).
    Built once per step: cached on the step's metadata, which every layer shares."""
    cache = meta.__dict__.setdefault("_lorry_selectors", {})
    sel = cache.get((L, R))
    if sel is None:
        cols = torch.arange(L * R, device=meta.token_slots.device) // R
        sel = cache[(L, R)] = meta.token_slots.long()[:, None] == cols[None, :]
    return sel


def _row_selector(meta: LoRAMeta, rows: int) -> torch.Tensor:
    """[T, rows] bool mask over row buffers: the rows of the token's adapter (its first row
    to its rank), none for slot -1. Cached on the step's metadata."""
    cache = meta.__dict__.setdefault("_lorry_selectors", {})
    sel = cache.get(("rows", rows))
    if sel is None:
        slots = meta.token_slots.long()
        table = meta.rows.table.long()
        base, rank = table[0][slots.clamp(min=0)], table[1][slots.clamp(min=0)]
        j = torch.arange(rows, device=slots.device)
        hit = (slots >= 0)[:, None] & (j >= base[:, None]) & (j < (base + rank)[:, None])
        sel = cache[("rows", rows)] = hit
    return sel


def _gather_index(meta: LoRAMeta, R: int, rows: int) -> torch.Tensor:
    """[T, R] long: the buffer row of rank index r of each token's adapter (rows past the
    buffer for tokens without adapter; the selector zeroes rows past a rank)."""
    slots = meta.token_slots.long()
    base = meta.rows.table.long()[0][slots.clamp(min=0)]
    idx = base[:, None] + torch.arange(R, device=slots.device)
    return torch.where((slots >= 0)[:, None], idx, rows)


def lora_shrink(x: torch.Tensor, lora_a: list[torch.Tensor], meta: LoRAMeta,
                out: torch.Tensor) -> None:
    """x: [T, H]; lora_a[s]: [L, R, H] (or [rows, H]); out: [S, T, R] (zero for tokens
    without adapter, and past a slot's rank with row buffers)."""
    if meta.rows is not None:
        R, rows = out.shape[-1], lora_a[0].shape[0]
        sel = _row_selector(meta, rows)
        gather = _gather_index(meta, R, rows)
        for s, a in enumerate(lora_a):
            full = _keep((x.to(a.dtype) @ a.t()).to(out.dtype), sel)                # [T, rows]
            out[s] = _keep(torch.gather(full, 1, gather.clamp(max=rows - 1)), gather < rows)
        return
    L, R, H = lora_a[0].shape
    sel = _selector(meta, L, R)
    for s, a in enumerate(lora_a):
        full = _keep((x.to(a.dtype) @ a.reshape(L * R, H).t()).to(out.dtype), sel)  # [T, L*R]
        out[s] = full.view(-1, L, R).sum(1)


def lora_expand(inter: torch.Tensor, lora_b: list[torch.Tensor], meta: LoRAMeta,
                y: torch.Tensor, slice_offsets: list[int]) -> None:
    """inter: [S, T, R]; lora_b[s]: [L, N_s, R] (or [N_s, rows]); y: [T, sum N_s] +=
    per-token expand."""
    if meta.rows is not None:
        R, rows = inter.shape[-1], lora_b[0].shape[1]
        sel = _row_selector(meta, rows)
        gather = _gather_index(meta, R, rows)
        T = inter.shape[1]
        for s, b in enumerate(lora_b):
            # the token's products scattered to its adapter's rows, masked past its rank
            z = torch.zeros(T, rows + R, dtype=inter.dtype, device=inter.device)
            z.scatter_(1, gather, inter[s])
            y[:, slice_offsets[s]:slice_offsets[s] + b.shape[0]] += \
                (_keep(z[:, :rows], sel).to(b.dtype) @ b.t()).to(y.dtype)
        return
    L, _, R = lora_b[0].shape
    sel = _selector(meta, L, R).view(-1, L, R)
    for s, b in enumerate(lora_b):
        z = _keep(inter[s][:, None, :], sel).reshape(-1, L * R)                   # [T, L*R]
        _add_expand(y, z, b, slice_offsets[s])


def _add_expand(y: torch.Tensor, z: torch.Tensor, b: torch.Tensor, off: int) -> None:
    # z: [T, L*R] (masked to each token's slot); b: [L, N, R] -> y[:, off:off+N] += z @ B^T
    L, N, R = b.shape
    b_flat = b.permute(1, 0, 2).reshape(N, L * R)                                 # [N, L*R]
    y[:, off:off + N] += (z.to(b.dtype) @ b_flat.t()).to(y.dtype)


_PACK = "_lorry_dense_pack"


def invalidate(lora_a: list[torch.Tensor]) -> None:
    """Forget the packed copy of a layer's adapters (its slot contents changed)."""
    lora_a[0].__dict__.pop(_PACK, None)


def _packed(lora_a: list[torch.Tensor], lora_b: list[torch.Tensor]):
    """(A_all [H, S*L*R], [B_s^T [L*R, N_s]]) contiguous, cached on ``lora_a[0]``."""
    key = (len(lora_a), tuple(lora_a[0].shape), tuple(b.shape for b in lora_b))
    hit = lora_a[0].__dict__.get(_PACK)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    if lora_a[0].dim() == 2:   # row buffers: [rows, H] and [N_s, rows]
        a_all = torch.cat(lora_a).t().contiguous()                                 # [H, S*rows]
        b_t = [b.t().contiguous() for b in lora_b]                                  # [rows, N_s]
        lora_a[0].__dict__[_PACK] = (key, a_all, b_t)
        return a_all, b_t
    L, R, H = lora_a[0].shape
    a_all = torch.cat([a.reshape(L * R, H) for a in lora_a]).t().contiguous()     # [H, S*L*R]
    b_t = [b.permute(0, 2, 1).reshape(L * R, b.shape[1]).contiguous() for b in lora_b]
    lora_a[0].__dict__[_PACK] = (key, a_all, b_t)
    return a_all, b_t


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor],
             lora_b: list[torch.Tensor], meta: LoRAMeta, slice_offsets: list[int],
             buffer: torch.Tensor | None = None) -> None:
    """y[:, slices] += LoRA(x) for every token with an adapter. x: [T, H], y: [T, N]."""
    check_layout(lora_a, meta, "lora_a")
    a_all, b_t = _packed(lora_a, lora_b)
    if meta.rows is not None:
        width = lora_a[0].shape[0]
        sel = _row_selector(meta, width)                                          # [T, rows]
    else:
        L, R, _ = lora_a[0].shape
        width = L * R
        sel = _selector(meta, L, R)                                                 # [T, L*R]
    z = x.to(a_all.dtype) @ a_all                                                   # [T, S*width]
    z = _keep(z.view(-1, len(lora_a), width), sel[:, None, :]).to(y.dtype)
    for s, bt in enumerate(b_t):
        n = bt.shape[1]
        y[:, slice_offsets[s]:slice_offsets[s] + n].addmm_(z[:, s], bt.to(y.dtype))
