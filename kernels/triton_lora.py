"""Triton backend for multi-adapter LoRA: launchers with torch_ref's signatures.

Every launch reads the per-slot token counts from device memory (LoRAMeta) and sizes its
grid from host constants (T, widths, max_loras), so there is no host sync and the calls can
be captured in a CUDA graph. Up to three slices go into one launch; more are done in groups.
"""
from __future__ import annotations

import torch

from lorry.kernels import tuning
from lorry.kernels.device_info import interpreted, num_sms
from lorry.kernels.launch_math import cdiv, next_pow2
from lorry.kernels.lora_decode import (
    PLAN_CONSTEXPRS,
    decode_plan,
    try_add_lora_decode,
    try_expand_folded_decode,
    workspace,
)
from lorry.kernels.segments import LoRAMeta
from lorry.kernels.slot_args import (
    a_strides,
    b_strides,
    b_width,
    check_layout,
    folded_geometry,
    max_rank,
    rows_args,
)
from lorry.kernels.triton_kernels import lora_expand_kernel, lora_shrink_kernel

MAX_SLICES_PER_LAUNCH = 3


def _check_device(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and not interpreted():
        raise RuntimeError(
            "the triton LoRA backend got CPU tensors but TRITON_INTERPRET is not set; use "
            "lora_backend='torch' on CPU, or set TRITON_INTERPRET=1 before importing triton")


def _block_l(max_loras: int) -> int:
    return max(16, next_pow2(max_loras))  # few variants to compile


# The two-launch kernels' settings come from kernels/configs/<GPU>.json's "prompt" table
# (lorry.kernels.tuning); tests and benchmarks set PROMPT_CONFIG to a full table to override it.
# Keys (0: the built-in rule): block_m (tokens per m-tile; by default by the tokens a slot is
# likely to hold, at most max_block_m), shrink_block_k, and the shrink's split of its
# reduction over H: doubled while the programs stay within shrink_programs_per_sm a SM, each
# part at least min_split_width wide, at most max_split_k; shrink_num_warps/_num_stages;
# expand_block_n, expand_num_warps/_num_stages.
PROMPT_CONFIG: dict | None = None


def prompt_config(device: torch.device) -> dict:
    """The two-launch table in force for ``device`` (PROMPT_CONFIG if set, else its file's)."""
    return PROMPT_CONFIG if PROMPT_CONFIG is not None else tuning.for_device(device)["prompt"]


def _block_m(num_tokens: int, max_loras: int, cfg: dict) -> int:
    """Tokens per m-tile (host constants only) under the prompt table ``cfg``."""
    if cfg["block_m"]:
        return cfg["block_m"]
    # Tiles as tall as the tokens a slot is likely to hold: decode batches put one or a few
    # tokens in each slot, and small tiles then waste no rows.
    per_slot = num_tokens // max(1, min(num_tokens, max_loras))
    if num_tokens <= 128 or per_slot <= 16:
        return 16
    tall = 32 if per_slot <= 32 else 64 if per_slot <= 64 else 128
    return max(16, min(tall, cfg["max_block_m"]))


def _num_m_tiles(num_tokens: int, max_loras: int, block_m: int) -> int:
    # Each slot's last tile may be partial: at most one extra tile per slot that has tokens.
    return cdiv(num_tokens, block_m) + min(max_loras, num_tokens)


def _precision(dtype: torch.dtype) -> str:
    # fp32 adapters get full fp32 products, as the torch reference computes them.
    return "ieee" if dtype == torch.float32 else "tf32"


def _groups(n: int):
    for g in range(0, n, MAX_SLICES_PER_LAUNCH):
        yield g, min(n, g + MAX_SLICES_PER_LAUNCH)


def prompt_plan(num_tokens: int, max_loras: int, hidden: int, device: torch.device) -> dict:
    """Block sizes and launch settings of the two-launch kernels for a batch of this shape."""
    cfg = prompt_config(device)
    block_m = _block_m(num_tokens, max_loras, cfg)
    block_k = cfg["shrink_block_k"] or (256 if block_m == 16 else 64)
    return {"block_m": block_m, "block_k": min(block_k, max(16, next_pow2(hidden))),
            "shrink_num_warps": cfg["shrink_num_warps"],
            "shrink_num_stages": cfg["shrink_num_stages"] or (3 if block_m == 16 else 2),
            # wider column tiles (256, 512) were slower for decode on an H200 (BENCHMARKS.md)
            "expand_block_n": cfg["expand_block_n"] or (128 if block_m == 16 else 64),
            "expand_num_warps": cfg["expand_num_warps"],
            "expand_num_stages": cfg["expand_num_stages"]}


def choose_split_k(num_tokens: int, max_loras: int, num_slices: int, hidden: int,
                   device: torch.device) -> int:
    """Split the shrink's reduction over hidden when too few programs would fill the GPU."""
    cfg = prompt_config(device)
    programs = _num_m_tiles(num_tokens, max_loras, _block_m(num_tokens, max_loras, cfg)) \
        * num_slices
    split = 1
    # Measured on an H200 (docs/BENCHMARKS.md): about two programs a SM are enough for a
    # decode batch; deeper splits cost more in the expand, which re-reads every partial sum
    # for each column tile.
    while (programs * split * 2 <= cfg["shrink_programs_per_sm"] * num_sms(device)
           and hidden // (split * 2) >= cfg["min_split_width"]
           and split * 2 <= cfg["max_split_k"]):
        split *= 2
    return split


def launch_key(num_tokens: int, max_loras: int, hidden: int, rank: int, widths: list[int],
               device: torch.device, tokens_per_slot: int | None = None) -> tuple:
    """What ``add_lora`` compiles for a step of ``num_tokens`` tokens on a layer of these
    shapes (host constants only, nothing launched): the decode path's plan where it takes the
    step, else the two-launch kernels' tiles and split. Steps of equal keys run the same
    compiled kernels (their integer arguments are not specialized), so a warm-up that runs one
    step of each key (engine.warmup) leaves nothing to compile mid-run. Assumes the engine's
    slot layout (A slices of one layout, B's rank axis contiguous), as ``add_lora`` gets it."""
    plan = decode_plan(num_tokens, max_loras, hidden, rank, widths, device, None,
                       tokens_per_slot)
    if plan is not None:
        return ("decode",) + tuple(plan[k] for k in PLAN_CONSTEXPRS)
    p = prompt_plan(num_tokens, max_loras, hidden, device)
    return ("two-launch", choose_split_k(num_tokens, max_loras, len(widths), hidden, device),
            _block_l(max_loras)) + tuple(sorted(p.items()))


def _check_slices(lora: list[torch.Tensor], what: str, meta: LoRAMeta) -> None:
    if not lora:
        raise ValueError(f"{what} must hold at least one slice, got an empty list")
    check_layout(lora, meta, what)
    dtypes = {t.dtype for t in lora}
    if len(dtypes) != 1:
        raise ValueError(f"{what} slices must share one dtype, got {sorted(map(str, dtypes))}")


def _shrink(x: torch.Tensor, lora_a: list[torch.Tensor], meta: LoRAMeta, out: torch.Tensor,
            split_k: int) -> None:
    # x: [T, H]; lora_a[s]: [L, R, H] (or [rows, H]: meta.rows); out: [split_k, S, T, R]
    T, H = x.shape
    R = max_rank(lora_a, meta)
    if T == 0:
        return
    plan = prompt_plan(T, meta.max_loras, H, x.device)
    block_m, block_k = plan["block_m"], plan["block_k"]
    block_n = min(max(16, next_pow2(R)), 64)
    for g0, g1 in _groups(len(lora_a)):
        a = lora_a[g0:g1]
        if any(t.stride() != a[0].stride() for t in a):
            raise ValueError("lora_a slices must share one memory layout (strides)")
        a_ptrs = a + [a[0]] * (MAX_SLICES_PER_LAUNCH - len(a))
        o = out[:, g0:g1]
        grid = (_num_m_tiles(T, meta.max_loras, block_m), cdiv(R, block_n) * split_k,
                g1 - g0)
        rows, rows_consts = rows_args(meta)
        lora_shrink_kernel[grid](
            x, *a_ptrs, o, meta.sorted_token_ids, meta.slot_token_counts, meta.slot_token_starts,
            rows, H, R, meta.max_loras,
            x.stride(0), x.stride(1), *a_strides(a[0]),
            o.stride(0), o.stride(1), o.stride(2), o.stride(3),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
            BLOCK_L=_block_l(meta.max_loras), SPLIT_K=split_k,
            PRECISION=_precision(a[0].dtype), UPCAST=interpreted(), **rows_consts,
            num_warps=plan["shrink_num_warps"], num_stages=plan["shrink_num_stages"])


def _expand(inter: torch.Tensor, lora_b: list[torch.Tensor], meta: LoRAMeta, y: torch.Tensor,
            slice_offsets: list[int], inter_slot_stride: int = 0) -> None:
    # inter: [split_k, S, T, R]; lora_b[s]: [L, N_s, R] (or [N_s, rows]: meta.rows); y: [T, N].
    # inter_slot_stride: the products of a slot start its position times it further (every
    # slot's side by side; 0: one per token)
    split_k, _, T, R = inter.shape
    if T == 0:
        return
    plan = prompt_plan(T, meta.max_loras, 0, y.device)
    block_m, block_n = plan["block_m"], plan["expand_block_n"]
    block_r = min(max(16, next_pow2(R)), 64)
    for g0, g1 in _groups(len(lora_b)):
        b = lora_b[g0:g1]
        offs = list(slice_offsets[g0:g1])
        widths = [b_width(t) for t in b]
        tiles = [cdiv(n, block_n) for n in widths]
        pad = MAX_SLICES_PER_LAUNCH - len(b)
        b_ptrs, widths, offs = b + [b[0]] * pad, widths + [0] * pad, offs + [0] * pad
        strides = [s for t in b_ptrs for s in b_strides(t)]
        tiles0 = tiles[0]
        tiles01 = tiles0 + (tiles[1] if len(tiles) > 1 else 0)
        i = inter[:, g0:g1]
        grid = (_num_m_tiles(T, meta.max_loras, block_m), sum(tiles))
        rows, rows_consts = rows_args(meta)
        lora_expand_kernel[grid](
            i, *b_ptrs, y, meta.sorted_token_ids, meta.slot_token_counts, meta.slot_token_starts,
            rows, R, meta.max_loras, *widths, *offs, tiles0, tiles01,
            i.stride(0), i.stride(1), i.stride(2), i.stride(3), inter_slot_stride, *strides,
            y.stride(0), y.stride(1),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r,
            BLOCK_L=_block_l(meta.max_loras), SPLIT_K=split_k,
            PRECISION=_precision(b[0].dtype), UPCAST=interpreted(), **rows_consts,
            num_warps=plan["expand_num_warps"], num_stages=plan["expand_num_stages"])


def lora_shrink(x: torch.Tensor, lora_a: list[torch.Tensor], meta: LoRAMeta,
                out: torch.Tensor) -> None:
    """x: [T, H]; lora_a[s]: [L, R, H]; out: [S, T, R] (written for tokens with an adapter)."""
    _check_device(x)
    _check_slices(lora_a, "lora_a", meta)
    _shrink(x, lora_a, meta, out.unsqueeze(0), split_k=1)


def lora_expand(inter: torch.Tensor, lora_b: list[torch.Tensor], meta: LoRAMeta,
                y: torch.Tensor, slice_offsets: list[int]) -> None:
    """inter: [S, T, R]; lora_b[s]: [L, N_s, R]; y: [T, sum N_s], accumulated in place."""
    _check_device(y)
    _check_slices(lora_b, "lora_b", meta)
    if len(slice_offsets) != len(lora_b):
        raise ValueError(f"slice_offsets has {len(slice_offsets)} entries for "
                         f"{len(lora_b)} lora_b slices; give one offset per slice")
    _expand(inter.unsqueeze(0), lora_b, meta, y, slice_offsets)


def add_lora_folded(y: torch.Tensor, inter: torch.Tensor, lora_b: list[torch.Tensor],
                    meta: LoRAMeta, slice_offsets: list[int], hidden: int) -> None:
    """y[:, slices] += LoRA for every token with an adapter, the shrink already done.

    ``inter`` [T, S*L*R] holds every slot's x·Aᵀ (the base matmul computes it when the A slot
    rows are folded under the weight: engine.lora.slot_layout); token t uses columns
    s*L*R + slot(t)*R .. +R of slice s. With row buffers (meta.rows) ``inter`` is
    [T, S*rows] and token t uses columns s*rows + base(slot(t)) .. + its rank.
    ``hidden``: the layer's input width (for the plan).
    """
    _check_device(y)
    _check_slices(lora_b, "lora_b", meta)
    if len(slice_offsets) != len(lora_b):
        raise ValueError(f"slice_offsets has {len(slice_offsets)} entries for "
                         f"{len(lora_b)} lora_b slices; give one offset per slice")
    T = y.shape[0]
    R = max_rank(lora_b, meta, b=True)
    # columns per slice, and how far a slot's products move with its position
    per_slice, pos_stride = folded_geometry(lora_b, meta)
    if inter.shape != (T, len(lora_b) * per_slice) or inter.stride(-1) != 1:
        raise ValueError(f"inter must be [T={T}, {len(lora_b) * per_slice}] (every slice's "
                         f"slot columns) with unit column stride, got {list(inter.shape)} "
                         f"strides {inter.stride()}")
    if T == 0 or try_expand_folded_decode(y, inter, lora_b, meta, slice_offsets, hidden):
        return
    # [1, S, T, R] view: slice s at column s*per_slice, token rows, a slot's products
    # position * pos_stride columns further
    view = inter.as_strided((1, len(lora_b), T, R), (0, per_slice, inter.stride(0), 1))
    _expand(view, lora_b, meta, y, slice_offsets, inter_slot_stride=pos_stride)



def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor],
             lora_b: list[torch.Tensor], meta: LoRAMeta, slice_offsets: list[int],
             buffer: torch.Tensor | None = None) -> None:
    """y[:, slices] += LoRA(x) for every token with an adapter. x: [T, H], y: [T, N].

    ``buffer`` ([S, T, R] float32, optional) holds the shrink result; without it, a
    workspace is allocated and the shrink may split its reduction over H across programs.
    """
    _check_device(x)
    _check_slices(lora_a, "lora_a", meta)
    _check_slices(lora_b, "lora_b", meta)
    if len(lora_a) != len(lora_b) or len(slice_offsets) != len(lora_b):
        raise ValueError(f"got {len(lora_a)} lora_a, {len(lora_b)} lora_b and "
                         f"{len(slice_offsets)} slice_offsets; give one of each per slice")
    T, H = x.shape
    S, R = len(lora_a), max_rank(lora_a, meta)
    if T == 0:
        return
    # Decode steps and prefill chunks the decode path takes (kernels/lora_decode.py): the
    # [T, R] partial products stay in L2.
    if buffer is None and try_add_lora_decode(y, x, lora_a, lora_b, meta, slice_offsets):
        return
    if buffer is None:
        split_k = choose_split_k(T, meta.max_loras, S, H, x.device)
        work = workspace(split_k, S, T, R, x.device)
    else:
        work = buffer.unsqueeze(0)
        split_k = 1
    _shrink(x, lora_a, meta, work, split_k)
    _expand(work, lora_b, meta, y, slice_offsets)
