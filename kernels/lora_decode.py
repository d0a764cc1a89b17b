"""Decode path of the Triton LoRA backend: one kernel of shrink and expand items.

The items (kernels/lora_decode_kernel.py) run in two launches of that kernel, the shrink items
then the expand items. ``kernels.triton_lora.add_lora`` calls :func:`try_add_lora_decode`
first; it returns False (and does nothing) when the batch is not one the path takes (see the
tuning tables below: decode steps, and prefill chunks in taller tiles; a caller's buffer, an
empty slice, B slices without a unit rank stride), and the shrink and expand kernels of
kernels/triton_kernels.py run. The two launches on Hopper are a programmatic dependent
pair ("pdl"): the expand launch starts once every shrink program has passed its own wait, and
waits in-kernel for the shrink to finish before it reads the products; with expand_loop 2 its
first weight and y tiles are loaded before that wait.
Every choice here is made from host constants (T, widths, max_loras, rank), so a decode step
takes the same path on every replay of a captured CUDA graph.
"""
from __future__ import annotations

import functools

import torch
import triton

from lorry.kernels import tuning
from lorry.kernels.device_info import interpreted, num_sms, pdl_supported
from lorry.kernels.launch_math import cdiv, next_pow2
from lorry.kernels.lora_decode_kernel import lora_decode_kernel
from lorry.kernels.segments import LoRAMeta, tile_table
from lorry.kernels.slot_args import (a_strides, b_strides, b_width, folded_geometry, max_rank,
                                     rows_args)

# The launch settings come from kernels/configs/<GPU>.json (lorry.kernels.tuning): "decode"
# for decode_plan, "fold" as entries over it for the expand alone over folded products.
# Keys of "decode": the path applies for min_tokens <= T <= max_tokens (0: never, whatever
# the "long" entries say), at most max_slices
# slices, slot widths up to max_rank, and min(T, max_loras) * output width >= min_expand_cols;
# past max_rows_per_slot tokens per slot the "long" entries replace the others (prefill
# chunks, in taller tiles; the long max_rows_per_slot then bounds the tokens a slot may hold:
# past it the two-launch kernels' taller tiles read each adapter's weights fewer times),
# where the widths add up to more than wide_cols the "wide" ones.
# rows: tokens per m-tile; tile_elems (with min_block_n / min_block_k): weight tile elements;
# max_split_k, programs_per_sm, num_warps, num_stages: the expand launch; shrink_*: the shrink
# launch's own (0: the expand's); expand_loop: the expand's column loop (0 = one-deep manual
# prefetch, 1 = software-pipelined num_stages deep, 2 = the same with the wait for the shrink
# in its first iteration, so that the pipeline's first loads go out before it); pdl: the
# expand launch starts beside the shrink (programmatic dependent launch, Hopper).
# Tests and benchmarks set these to a full table to override the device's file.
DECODE_CONFIG: dict | None = None
FOLD_CONFIG: dict | None = None

# The entries of a decode plan that reach the kernel as constexprs or launch options: each new
# combination is a compile. The others (item and tile counts) are plain integer arguments,
# kept from specialization (lora_decode_kernel.UNSPECIALIZED).
PLAN_CONSTEXPRS = ("rows", "block_m", "block_n", "block_r", "block_k", "split_k", "num_warps",
                   "num_stages", "expand_loop", "pdl", "shrink_num_warps", "shrink_num_stages")


def decode_config(device: torch.device) -> dict:
    """The decode table in force for ``device`` (DECODE_CONFIG if set, else its file's)."""
    return DECODE_CONFIG if DECODE_CONFIG is not None else tuning.for_device(device)["decode"]


def fold_config(device: torch.device) -> dict:
    """The fold entries in force for ``device`` (FOLD_CONFIG if set, else its file's)."""
    return FOLD_CONFIG if FOLD_CONFIG is not None else tuning.for_device(device)["fold"]


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _unit_rank_stride(lora_b: list[torch.Tensor]) -> bool:
    # The kernel takes B's rank axis as contiguous (the engine's slots and slot views are):
    # a constant stride lets the compiler vectorize the weight loads.
    return all(b_strides(b)[2] == 1 for b in lora_b)


@functools.cache
def _pipelines_loops_with_waits() -> bool:
    """Triton 3.6-3.8 software-pipeline expand_loop 2's column loop with the PDL wait in it;
    3.9 leaves it unpipelined (plain loads, no cp.async: benchmarks/kernel_report.py), and
    expand_loop 1 is then taken instead. Measured (H200) on 3.6 only."""
    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    return (major, minor) < (3, 9)


def decode_plan(T: int, max_loras: int, hidden: int, rank: int, widths: list[int],
                device: torch.device, cfg: dict | None = None,
                tokens_per_slot: int | None = None) -> dict | None:
    """Block sizes and item counts of the decode launch, or None if the path does not apply.
    ``tokens_per_slot``: LoRAMeta's host hint (the adapter tokens over the slots holding
    them), which the long entries' bound then takes instead of T // min(T, max_loras)."""
    cfg = decode_config(device) if cfg is None else cfg
    if cfg["max_tokens"] <= 0:
        return None                                  # the path is off, long entries included
    if sum(widths) > cfg.get("wide_cols", sum(widths)):
        cfg = dict(cfg, **cfg.get("wide", {}))
    active = min(T, max_loras)                       # slots that can hold tokens
    if T > 0 and T // max(1, active) > cfg["max_rows_per_slot"]:
        if not cfg.get("long"):
            return None
        per_slot = T // max(1, active) if tokens_per_slot is None else tokens_per_slot
        if per_slot > cfg["long"].get("max_rows_per_slot", T):
            return None                              # past the long tiles' reach too
        cfg = dict(cfg, **cfg["long"])               # every limit below is the long one's
    S = len(widths)
    if not (max(1, cfg["min_tokens"]) <= T <= cfg["max_tokens"]) or S > min(3, cfg["max_slices"]) \
            or min(widths) <= 0 \
            or not 0 < rank <= cfg["max_rank"] \
            or active * sum(widths) < cfg["min_expand_cols"]:
        return None
    rows = cfg["rows"]
    block_r = max(16, next_pow2(rank))
    tile = max(cfg.get("min_block_n", 32), cfg["tile_elems"] // block_r)
    block_n = min(tile, 1024, max(16, next_pow2(max(widths))))
    shrink_tile = max(cfg.get("min_block_k", 32),
                      (cfg.get("shrink_tile_elems") or cfg["tile_elems"]) // block_r)
    block_k = min(shrink_tile, 1024, max(16, next_pow2(hidden)))
    target = cfg["programs_per_sm"] * num_sms(device)
    shrink_target = (cfg.get("shrink_programs_per_sm") or cfg["programs_per_sm"]) * num_sms(device)
    # Split the reduction over H until the shrink items fill the GPU (at most one k tile
    # per item); the expand sums the split_k partial products of its rows.
    split_k = max(1, min(cfg["max_split_k"], cdiv(hidden, block_k),
                         shrink_target // (active * S)))
    n_mtiles = cdiv(T, rows) + active
    # Column chunks of nsub tiles each, so that about `target` expand items stream the weights.
    subtiles = [cdiv(n, block_n) for n in widths]
    nsub = max(1, cdiv(active * sum(subtiles), target))
    chunks = [cdiv(s, nsub) for s in subtiles]
    n_shrink = n_mtiles * S * split_k
    cc = [sum(chunks[:i + 1]) for i in range(S)] + [sum(chunks)] * (3 - S)
    expand_loop = cfg.get("expand_loop", 0)
    if expand_loop == 2 and device.type == "cuda" and not _pipelines_loops_with_waits():
        expand_loop = 1
    return {"rows": rows, "block_m": max(16, next_pow2(rows)),
            "block_n": block_n, "block_r": block_r,
            "block_k": block_k, "split_k": split_k, "nsub": nsub, "n_mtiles": n_mtiles,
            "n_shrink": n_shrink, "cc": cc, "n_items": n_shrink + n_mtiles * cc[2],
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
            "expand_loop": expand_loop, "pdl": bool(cfg.get("pdl", 0)),
            "shrink_num_warps": cfg.get("shrink_num_warps") or cfg["num_warps"],
            "shrink_num_stages": cfg.get("shrink_num_stages") or cfg["num_stages"]}


def workspace(split_k: int, slices: int, T: int, R: int, device: torch.device) -> torch.Tensor:
    """[split_k, slices, T, R] fp32 for the shrink's partial products, its token axis
    allocated to a multiple of 16: the split and slice strides reach the kernels as
    specialized integers, and with a rank such as 8 their %16 class would otherwise follow
    T's parity (a compile per class, mid-run)."""
    padded = -(-T // 16) * 16
    return torch.empty(split_k, slices, padded, R, dtype=torch.float32,
                       device=device)[:, :, :T]


def try_add_lora_decode(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor],
                        lora_b: list[torch.Tensor], meta: LoRAMeta,
                        slice_offsets: list[int]) -> bool:
    """y[:, slices] += LoRA(x) on the decode path if it takes this batch; False otherwise."""
    T, H = x.shape
    R = max_rank(lora_a, meta)
    widths = [b_width(b) for b in lora_b]
    plan = decode_plan(T, meta.max_loras, H, R, widths, x.device, None, meta.tokens_per_slot)
    if plan is None or any(a.stride() != lora_a[0].stride() for a in lora_a) \
            or not _unit_rank_stride(lora_b):
        return False
    work = workspace(plan["split_k"], len(lora_a), T, R, x.device)
    _launch(plan, x, lora_a, lora_b, y, work, (*work.stride()[:3], 0), meta, slice_offsets,
            shrink=True)
    return True


def try_expand_folded_decode(y: torch.Tensor, inter: torch.Tensor, lora_b: list[torch.Tensor],
                             meta: LoRAMeta, slice_offsets: list[int], hidden: int) -> bool:
    """The expand items alone over ``inter`` [T, S*L*R] (every slot's x·Aᵀ, from the base
    matmul with the A rows folded in): y[:, slices] += inter[t, s, slot(t)] @ B_s[slot(t)]ᵀ.
    False (nothing done) where the decode path does not apply (``hidden``: the plan's H)."""
    T = y.shape[0]
    R = max_rank(lora_b, meta, b=True)
    widths = [b_width(b) for b in lora_b]
    cfg = dict(decode_config(y.device), **fold_config(y.device))
    plan = decode_plan(T, meta.max_loras, hidden, R, widths, y.device, cfg,
                       meta.tokens_per_slot)
    if plan is None or not _unit_rank_stride(lora_b):
        return False
    plan = dict(plan, split_k=1)
    # work[kp, s, t, r] = inter[t, s*per_slice + pos(slot)*pos_stride + r]: strides (split,
    # slice, token, slot position)
    per_slice, pos_stride = folded_geometry(lora_b, meta)
    strides = (0, per_slice, inter.stride(0), pos_stride)
    _launch(plan, None, None, lora_b, y, inter, strides, meta, slice_offsets, shrink=False)
    return True


def _launch(plan: dict, x, lora_a, lora_b, y, work, work_strides, meta: LoRAMeta,
            slice_offsets, shrink: bool) -> None:
    """The shrink and expand launches of a plan (only the expand when ``shrink`` is False:
    x and lora_a are then unused, and ``work`` holds the products)."""
    S = len(lora_b)
    pad = 3 - S
    if lora_a is None:
        x, lora_a = y, [lora_b[0]] * S          # placeholders: the shrink items do not run
    H, R = x.shape[1], max_rank(lora_b, meta, b=True)
    a_ptrs = lora_a + [lora_a[0]] * pad
    b_ptrs = lora_b + [lora_b[0]] * pad
    bs = [s for t in b_ptrs for s in b_strides(t)[:2]]    # the rank stride is 1
    widths = [b_width(b) for b in lora_b] + [0] * pad
    offs = list(slice_offsets) + [0] * pad
    cc0, cc01, cc_all = plan["cc"]
    rows, rows_consts = rows_args(meta)
    args = (x, *a_ptrs, *b_ptrs, y, work, tile_table(meta, plan["rows"]), rows, H, R,
            meta.max_loras, *widths, *offs, cc0, cc01, cc_all)
    strides = (x.stride(0), x.stride(1), *a_strides(lora_a[0]), *bs,
               y.stride(0), y.stride(1), *work_strides)
    consts = {"NUM_SLICES": S, "ROWS": plan["rows"], "BLOCK_M": plan["block_m"],
              "BLOCK_N": plan["block_n"], "BLOCK_R": plan["block_r"], "BLOCK_K": plan["block_k"],
              "SPLIT_K": plan["split_k"], "PRECISION": _precision(lora_b[0].dtype),
              "UPCAST": interpreted(), "EXPAND_LOOP": plan["expand_loop"],
              "STAGES": plan["num_stages"], **rows_consts}
    expand_launch = {"num_warps": plan["num_warps"], "num_stages": plan["num_stages"]}
    shrink_launch = {"num_warps": plan["shrink_num_warps"],
                     "num_stages": plan["shrink_num_stages"]}
    # Only for a shrink and expand pair: the shrink waits for the kernel before it, and the
    # expand, which reads y before its wait, is launched from the shrink, by then past its wait.
    if plan["pdl"] and shrink and pdl_supported(y.device):
        expand_launch.update(USE_PDL=True, launch_pdl=True)
        shrink_launch.update(USE_PDL=True, launch_pdl=True)
    n_shrink, n_items, nsub = plan["n_shrink"], plan["n_items"], plan["nsub"]
    # PHASE: each launch compiles only its own items' code (the shrink's needs far fewer
    # registers than the expand's, so more of its programs fit on an SM)
    if shrink:
        lora_decode_kernel[(n_shrink,)](*args, 0, n_shrink, nsub, *strides, PHASE=1, **consts,
                                        **shrink_launch)
    lora_decode_kernel[(n_items - n_shrink,)](*args, n_shrink, n_shrink, nsub, *strides,
                                              PHASE=2, **consts, **expand_launch)
