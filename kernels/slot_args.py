"""How the LoRA launchers read a slot's weights: per-slot stacks or row buffers.

Per-slot stacks (``lora_a[s]`` [L, R, H], ``lora_b[s]`` [L, N_s, R]) put slot l at index l.
Row buffers (``lora_a[s]`` [rows, H], ``lora_b[s]`` [N_s, rows], with LoRAMeta.rows) hold every
slot's adapter as a run of rows from its first row, as long as its own rank: slot memory shared
by rank (engine.lora.gpu_slots). The kernels take one "position" per slot either way: the index
or the first row, times the strides given here.
"""
from __future__ import annotations

import torch

from lorry.kernels.segments import LoRAMeta


def rows_args(meta: LoRAMeta) -> tuple[torch.Tensor, dict]:
    """(the rows pointer, HAS_ROWS / ROW_ALIGN) of a launch: the slots' places and ranks when
    the meta has them (kernels.segments.SlotRows); any int32 tensor stands in for the pointer
    otherwise (it is not read)."""
    if meta.rows is None:
        return meta.slot_token_counts, {"HAS_ROWS": False, "ROW_ALIGN": 1}
    return meta.rows.table, {"HAS_ROWS": True, "ROW_ALIGN": meta.rows.row_align}


def a_strides(a: torch.Tensor) -> tuple[int, int, int]:
    """(slot, rank, hidden) strides of an A slice: a per-slot stack [L, R, H], or a row buffer
    [rows, H] (the slot's position is then its first row)."""
    return (a.stride(0), a.stride(0), a.stride(1)) if a.dim() == 2 else tuple(a.stride())


def b_strides(b: torch.Tensor) -> tuple[int, int, int]:
    """(slot, column, rank) strides of a B slice: [L, N, R], or a row buffer [N, rows]."""
    return (b.stride(1), b.stride(0), b.stride(1)) if b.dim() == 2 else tuple(b.stride())


def b_width(b: torch.Tensor) -> int:
    """Output columns of a B slice ([L, N, R], or a row buffer [N, rows])."""
    return b.shape[0] if b.dim() == 2 else b.shape[1]


def max_rank(lora_a_or_b: list[torch.Tensor], meta: LoRAMeta, b: bool = False) -> int:
    """R: the widest rank a slot holds (the row buffers' from the meta)."""
    if meta.rows is not None:
        return meta.rows.max_rank
    return lora_a_or_b[0].shape[2 if b else 1]


def folded_geometry(lora_b: list[torch.Tensor], meta: LoRAMeta) -> tuple[int, int]:
    """(columns of one slice in the folded products, the column stride of a slot's position):
    (L*R, R) for per-slot stacks, (rows, 1) for row buffers."""
    if meta.rows is not None:
        return lora_b[0].shape[1], 1
    L, _, R = lora_b[0].shape
    return L * R, R


def check_layout(lora: list[torch.Tensor], meta: LoRAMeta, what: str) -> None:
    """Row buffers (2-D slices) go with LoRAMeta.rows, per-slot stacks (3-D) without it."""
    if (lora[0].dim() == 2) != (meta.rows is not None):
        raise ValueError(f"{what} slices are {lora[0].dim()}-D but the meta "
                         f"{'has no' if meta.rows is None else 'has'} SlotRows: row buffers "
                         "[rows, H] / [N, rows] need LoRAMeta.rows (build_lora_meta(..., rows)), "
                         "per-slot stacks [L, R, H] / [L, N, R] take none")
