"""Vectorised torch LoRA ops for the CPU: the contract of kernels.torch_ref, without loops.

Each token's adapter is selected by a one-hot mask over the stacked slots, so a step costs two
dense matmuls per slice with inner size max_loras * R (small on CPU: e.g. 4 * 8) and no host
sync or per-slot Python loop. kernels.torch_ref stays the plain reference they are tested on.
"""
from __future__ import annotations

import torch

from kernels.segments import LoRAMeta


def _selector(meta: LoRAMeta, L: int, R: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, L*R] mask: 1 on the R columns of the token's slot, 0 elsewhere (and for slot -1)."""
    cols = torch.arange(L * R, device=meta.token_slots.device) // R
    return (meta.token_slots.long()[:, None] == cols[None, :]).to(dtype)


def lora_shrink(x: torch.Tensor, lora_a: list[torch.Tensor], meta: LoRAMeta,
                out: torch.Tensor) -> None:
    """x: [T, H]; lora_a[s]: [L, R, H]; out: [S, T, R] (zero for tokens without adapter)."""
    L, R, H = lora_a[0].shape
    sel = _selector(meta, L, R, out.dtype)
    for s, a in enumerate(lora_a):
        full = (x.to(a.dtype) @ a.reshape(L * R, H).t()).to(out.dtype) * sel      # [T, L*R]
        out[s] = full.view(-1, L, R).sum(1)


def lora_expand(inter: torch.Tensor, lora_b: list[torch.Tensor], meta: LoRAMeta,
                y: torch.Tensor, slice_offsets: list[int]) -> None:
    """inter: [S, T, R]; lora_b[s]: [L, N_s, R]; y: [T, sum N_s] += per-token expand."""
    L, _, R = lora_b[0].shape
    sel = _selector(meta, L, R, inter.dtype).view(-1, L, R)
    for s, b in enumerate(lora_b):
        z = (inter[s][:, None, :] * sel).reshape(-1, L * R)                        # [T, L*R]
        _add_expand(y, z, b, slice_offsets[s])


def _add_expand(y: torch.Tensor, z: torch.Tensor, b: torch.Tensor, off: int) -> None:
    # z: [T, L*R] (masked to each token's slot); b: [L, N, R] -> y[:, off:off+N] += z @ B^T
    L, N, R = b.shape
    b_flat = b.permute(1, 0, 2).reshape(N, L * R)                                 # [N, L*R]
    y[:, off:off + N] += (z.to(b.dtype) @ b_flat.t()).to(y.dtype)


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor],
             lora_b: list[torch.Tensor], meta: LoRAMeta, slice_offsets: list[int],
             buffer: torch.Tensor | None = None) -> None:
    """y[:, slices] += LoRA(x) for every token with an adapter. x: [T, H], y: [T, N]."""
    L, R, H = lora_a[0].shape
    sel = _selector(meta, L, R, lora_a[0].dtype)
    xa = x.to(lora_a[0].dtype)
    for s, (a, b) in enumerate(zip(lora_a, lora_b)):
        z = (xa @ a.reshape(L * R, H).t()) * sel                                   # [T, L*R]
        _add_expand(y, z, b, slice_offsets[s])
