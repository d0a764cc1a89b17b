"""Triton LoRA kernels against the torch reference and a per-row loop, over adversarial mixes."""
from __future__ import annotations

import pytest
import torch

from lorry.kernels.backends import get_lora_ops
from tests.kernels.cases import MIXES, TOLERANCE, loop_reference, make_problem, rel_error

triton_ops = get_lora_ops("triton")
torch_ops = get_lora_ops("reference")
WIDTHS = [40, 24, 24]          # q/k/v of a GQA model: unequal slice widths


def _run(ops, p, **kw):
    y = p.y.clone()
    ops.add_lora(y, p.x, p.lora_a, p.lora_b, p.meta, p.offsets, **kw)
    return y


def _check(p, y, dtype):
    ref = loop_reference(p)
    assert rel_error(y, ref) < TOLERANCE[dtype]
    # Rows without adapter are untouched, bit for bit.
    no_adapter = (p.slots < 0)
    assert torch.equal(y[no_adapter], p.y[no_adapter])


# Every mix at odd sizes; "distinct" (one slot per token) stops at 40 tokens because each
# slot is a program of its own and the CPU interpreter runs programs one by one.
CASES = [(mix, t) for mix in MIXES for t in (1, 7, 133) if (mix, t) != ("distinct", 133)]


# The tests open the path to every shape it supports, whatever the tuned limits are.
OPEN = {"min_tokens": 1, "max_tokens": 256, "max_slices": 3, "max_rank": 64,
        "min_expand_cols": 0}


def _decode_cfg(monkeypatch, **kw):
    from lorry.kernels import lora_decode
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = dict(lora_decode.decode_config(device), **OPEN)
    cfg.update(kw)
    monkeypatch.setattr(lora_decode, "DECODE_CONFIG", cfg)
    return lora_decode


def _use_path(monkeypatch, path):
    """Route add_lora through one path: "decode" (opened to every shape it takes) or
    "two_launch"."""
    lora_decode = _decode_cfg(monkeypatch, **({} if path == "decode" else {"max_tokens": 0}))
    monkeypatch.setattr(lora_decode, "FOLD_CONFIG", {})


@pytest.mark.parametrize("path", ["decode", "two_launch"])
@pytest.mark.parametrize("mix,num_tokens", CASES + [("distinct", 40)])
def test_add_lora_matches_loop_and_torch_ref(mix, num_tokens, path, monkeypatch, device):
    _use_path(monkeypatch, path)
    p = make_problem(num_tokens=num_tokens, hidden=72, widths=WIDTHS, max_rank=16,
                     ranks=[16, 8, 1], mix=mix, dtype=torch.float32, device=device)
    y_tri = _run(triton_ops, p)
    y_ref = _run(torch_ops, p)
    _check(p, y_tri, torch.float32)
    _check(p, y_ref, torch.float32)
    assert rel_error(y_tri, y_ref) < 1e-5
    if mix != "all_without":
        assert not torch.equal(y_tri, p.y), "the adapters changed nothing"


@pytest.mark.parametrize("path", ["decode", "two_launch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dtypes_and_ranks_zero_padded_into_wide_slots(dtype, path, monkeypatch, device):
    _use_path(monkeypatch, path)
    # Ranks 1/8/16/64 side by side in 64-wide slots; hidden size not a power of two.
    p = make_problem(num_tokens=133, hidden=100, widths=WIDTHS, max_rank=64,
                     ranks=[1, 8, 16, 64], mix="some_without", dtype=dtype, device=device,
                     seed=1)
    y = _run(triton_ops, p)
    assert y.dtype == dtype
    _check(p, y, dtype)


def test_caller_buffer_is_used_and_matches(device):
    p = make_problem(num_tokens=7, hidden=72, widths=WIDTHS, max_rank=16, ranks=[16],
                     mix="skewed", dtype=torch.float32, device=device)
    buffer = torch.full((3, 7, 16), float("nan"), device=device)
    y = _run(triton_ops, p, buffer=buffer)
    _check(p, y, torch.float32)
    has_slot = p.slots >= 0
    assert torch.isfinite(buffer[:, has_slot]).all()


def test_split_reduction_over_long_hidden(monkeypatch, device):
    # Few tokens over a long hidden size: the shrink splits its reduction across programs.
    from lorry.kernels.triton_lora import choose_split_k
    _decode_cfg(monkeypatch, max_tokens=0)           # the two-launch path, not the decode one
    p = make_problem(num_tokens=7, hidden=2100, widths=[24], max_rank=16, ranks=[16, 8],
                     mix="some_without", dtype=torch.float32, device=device)
    assert choose_split_k(7, p.meta.max_loras, 1, 2100, torch.device(device)) > 1
    _check(p, _run(triton_ops, p), torch.float32)


# Settings of the two-launch kernels' "prompt" table a sweep may choose (tall tiles, a forced
# split of the reduction, other column tiles, warps and stages): each must stay exact.
PROMPT_SETTINGS = [{"block_m": 128}, {"max_block_m": 128},
                   {"shrink_programs_per_sm": 1000, "min_split_width": 16, "max_split_k": 4},
                   {"shrink_block_k": 32, "shrink_num_stages": 4, "shrink_num_warps": 8},
                   {"expand_block_n": 16, "expand_num_warps": 8, "expand_num_stages": 3}]


@pytest.mark.parametrize("setting", PROMPT_SETTINGS, ids=lambda s: ",".join(s))
def test_prompt_table_settings_match_the_loop(setting, monkeypatch, device):
    from lorry.kernels import triton_lora
    _decode_cfg(monkeypatch, max_tokens=0)
    cfg = dict(triton_lora.prompt_config(torch.device(device)), **setting)
    monkeypatch.setattr(triton_lora, "PROMPT_CONFIG", cfg)
    # a skewed mix over 5 slots: one holds most of the 400 tokens (tall tiles past 64 a slot)
    p = make_problem(num_tokens=400, hidden=72, widths=WIDTHS, max_rank=16, ranks=[16, 8, 1],
                     mix="skewed", dtype=torch.float32, device=device, seed=2)
    plan = triton_lora.prompt_plan(400, p.meta.max_loras, 72, torch.device(device))
    for key in ("block_m", "expand_block_n", "expand_num_warps"):
        if key in setting:
            assert plan[key] == setting[key]
    if "max_block_m" in setting:
        assert plan["block_m"] == 128
    if "max_split_k" in setting:
        assert triton_lora.choose_split_k(400, p.meta.max_loras, 3, 72,
                                          torch.device(device)) == 4
    _check(p, _run(triton_ops, p), torch.float32)


def test_more_slices_than_one_launch_holds(device):
    p = make_problem(num_tokens=7, hidden=40, widths=[16, 24, 8, 32], max_rank=8,
                     ranks=[8, 1], mix="some_without", dtype=torch.float32, device=device)
    _check(p, _run(triton_ops, p), torch.float32)


def test_shrink_and_expand_alone_match_torch_ref(device):
    p = make_problem(num_tokens=133, hidden=72, widths=WIDTHS, max_rank=16, ranks=[16, 4],
                     mix="skewed", dtype=torch.bfloat16, device=device)
    has_slot = p.slots >= 0
    outs = []
    for ops in (triton_ops, torch_ops):
        out = torch.zeros(3, 133, 16, device=device)
        ops.lora_shrink(p.x, p.lora_a, p.meta, out)
        outs.append(out)
    assert rel_error(outs[0][:, has_slot], outs[1][:, has_slot]) < 1e-2
    ys = []
    for ops in (triton_ops, torch_ops):
        y = p.y.clone()
        ops.lora_expand(outs[1], p.lora_b, p.meta, y, p.offsets)
        ys.append(y)
    assert rel_error(ys[0], ys[1]) < 1e-2
    assert torch.equal(ys[0][~has_slot], p.y[~has_slot])


def test_mismatched_slices_are_refused(device):
    p = make_problem(num_tokens=7, hidden=40, widths=WIDTHS, max_rank=8, ranks=[8],
                     mix="uniform", dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match="slice_offsets"):
        triton_ops.add_lora(p.y, p.x, p.lora_a, p.lora_b, p.meta, p.offsets[:2])
    with pytest.raises(ValueError, match="lora_a"):
        triton_ops.add_lora(p.y, p.x, [], p.lora_b, p.meta, p.offsets)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="'cuda'.*torch.*triton"):
        get_lora_ops("cuda")


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = make_problem(num_tokens=1, hidden=16, widths=[16], max_rank=8, ranks=[8],
                     mix="uniform", dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_ops.add_lora(p.y, p.x, p.lora_a, p.lora_b, p.meta, p.offsets)


def test_importing_kernels_does_not_import_triton():
    # Boxes without triton (CPU workers) must still import kernels and use the torch backend.
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; from lorry.kernels.backends import get_lora_ops; "
            "get_lora_ops('reference'); get_lora_ops('torch'); sys.exit('triton' in sys.modules)")
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode == 0


# ---- decode path (kernels/lora_decode.py): decode steps and prefill chunks -------------------

# expand_loop: the expand's column loop prefetched by hand (0) or software-pipelined by the
# compiler (1; 2: with the wait for the products in its first iteration)
@pytest.mark.parametrize("expand_loop", [0, 1, 2])
@pytest.mark.parametrize("shape", ["split", "chunks"])
@pytest.mark.parametrize("mix,num_tokens", [("distinct", 7), ("uniform", 7), ("some_without", 9),
                                            ("skewed", 12), ("all_without", 3)])
def test_decode_path_matches_loop(mix, num_tokens, shape, expand_loop, monkeypatch, device):
    # Small tiles, so that uniform puts 7 tokens of one slot in two m-tiles (4 rows a tile),
    # and either the reduction over H is split across programs ("split") or each program
    # streams several column tiles and each slice has several column chunks ("chunks").
    # The plan is sized for 8 SMs on every device, so that on a GPU too the items stream
    # several column tiles each (the pipelined loops past their first iteration).
    pps = 64 if shape == "split" else 4
    dec = _decode_cfg(monkeypatch, tile_elems=512, programs_per_sm=pps,
                      shrink_programs_per_sm=pps, shrink_tile_elems=512, max_rows_per_slot=8,
                      max_split_k=3, expand_loop=expand_loop, min_block_n=16, min_block_k=16)
    monkeypatch.setattr(dec, "num_sms", lambda device: 8)
    widths = [200, 72, 40]
    p = make_problem(num_tokens=num_tokens, hidden=100, widths=widths, max_rank=16,
                     ranks=[16, 8, 1], mix=mix, dtype=torch.float32, device=device)
    plan = dec.decode_plan(num_tokens, p.meta.max_loras, 100, 16, widths, torch.device(device))
    assert plan is not None
    assert plan["split_k"] == 3 if shape == "split" else (plan["nsub"] > 1 and
                                                           plan["cc"][0] > 1)
    y = _run(triton_ops, p)
    _check(p, y, torch.float32)
    assert rel_error(y, _run(torch_ops, p)) < 1e-5


@pytest.mark.parametrize("rows", [16, 32])
@pytest.mark.parametrize("mix", ["skewed", "uniform", "some_without"])
def test_prefill_chunks_take_the_decode_path_in_taller_tiles(mix, rows, monkeypatch, device):
    # Past max_rows_per_slot tokens per slot the "long" entries apply: taller tiles (16 rows:
    # a slot with 40 tokens spans three tiles, the last one partial; 32 rows need 32-row dots)
    dec = _decode_cfg(monkeypatch, max_tokens=2048, long={"rows": rows})
    monkeypatch.setattr(dec, "num_sms", lambda device: 8)
    T, widths = 150, [96, 40]
    p = make_problem(num_tokens=T, hidden=72, widths=widths, max_rank=16, ranks=[16, 4],
                     mix=mix, dtype=torch.float32, device=device, seed=5)
    plan = dec.decode_plan(T, p.meta.max_loras, 72, 16, widths, torch.device(device))
    assert plan is not None and plan["rows"] == rows and plan["block_m"] == rows
    y = _run(triton_ops, p)
    _check(p, y, torch.float32)
    assert rel_error(y, _run(torch_ops, p)) < 1e-5
    # without the "long" entries such a batch is not the decode path's, nor above their rank
    dec = _decode_cfg(monkeypatch, max_tokens=2048, long={})
    assert dec.decode_plan(T, p.meta.max_loras, 72, 16, widths, torch.device(device)) is None
    dec = _decode_cfg(monkeypatch, max_tokens=2048, long={"rows": 16, "max_rank": 16})
    assert dec.decode_plan(T, p.meta.max_loras, 72, 16, widths, torch.device(device))
    assert dec.decode_plan(T, p.meta.max_loras, 72, 64, widths, torch.device(device)) is None
    # nor past the long entries' own tokens a slot (150 tokens over 5 slots: 30 each)
    dec = _decode_cfg(monkeypatch, max_tokens=2048, long={"rows": 16, "max_rows_per_slot": 30})
    assert dec.decode_plan(T, p.meta.max_loras, 72, 16, widths, torch.device(device))
    dec = _decode_cfg(monkeypatch, max_tokens=2048, long={"rows": 16, "max_rows_per_slot": 29})
    assert dec.decode_plan(T, p.meta.max_loras, 72, 16, widths, torch.device(device)) is None


def test_rank_64_takes_tiles_of_the_floor_sizes(monkeypatch, device):
    # rank 64: 4096-element tiles would be 64 columns wide; the floors make them 128 (and the
    # shrink's k tiles 64), each item streaming more than one of them
    dec = _decode_cfg(monkeypatch)
    monkeypatch.setattr(dec, "num_sms", lambda device: 1)
    widths = [300, 72]
    p = make_problem(num_tokens=9, hidden=133, widths=widths, max_rank=64, ranks=[64, 16, 1],
                     mix="some_without", dtype=torch.float32, device=device, seed=4)
    plan = dec.decode_plan(9, p.meta.max_loras, 133, 64, widths, torch.device(device))
    assert (plan["block_r"], plan["block_n"], plan["block_k"]) == (64, 128, 64)
    assert plan["nsub"] > 1
    y = _run(triton_ops, p)
    _check(p, y, torch.float32)


def test_expand_loop_2_falls_back_where_triton_does_not_pipeline_it(monkeypatch):
    dec = _decode_cfg(monkeypatch)
    monkeypatch.setattr(dec, "num_sms", lambda device: 132)
    args = (64, 32, 4096, 16, [14336, 14336])
    monkeypatch.setattr(dec, "_pipelines_loops_with_waits", lambda: True)
    assert dec.decode_plan(*args, torch.device("cuda"))["expand_loop"] == 2
    monkeypatch.setattr(dec, "_pipelines_loops_with_waits", lambda: False)
    assert dec.decode_plan(*args, torch.device("cuda"))["expand_loop"] == 1
    # the interpreter runs expand_loop 2 whatever the Triton version (CI tests it)
    assert dec.decode_plan(*args, torch.device("cpu"))["expand_loop"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_rank", [8, 64])
def test_decode_path_dtypes_ranks_and_odd_sizes(dtype, max_rank, monkeypatch, device):
    dec = _decode_cfg(monkeypatch)
    ranks = [1, 8, 16, 64] if max_rank == 64 else [1, 8]
    p = make_problem(num_tokens=5, hidden=133, widths=[61], max_rank=max_rank, ranks=ranks,
                     mix="some_without", dtype=dtype, device=device, seed=3)
    assert dec.decode_plan(5, p.meta.max_loras, 133, max_rank, [61],
                           torch.device(device)) is not None
    y = _run(triton_ops, p)
    assert y.dtype == dtype
    _check(p, y, dtype)


@pytest.mark.parametrize("path", ["decode", "two_launch"])
def test_strided_slot_views_into_one_buffer(path, monkeypatch, device):
    # Slot buffers as views into one big tensor (non-unit, non-contiguous slot strides), as
    # an engine may lay out its slots: the kernels must follow the tensors' strides.
    from lorry.kernels import lora_decode as dec
    _use_path(monkeypatch, path)
    decode = path == "decode"
    p = make_problem(num_tokens=7, hidden=72, widths=WIDTHS, max_rank=16, ranks=[16, 4],
                     mix="some_without", dtype=torch.float32, device=device)
    L = p.meta.max_loras
    big_a = torch.zeros(L, 3, 2, 16, 72, device=device)          # [L, slice, pad, R, H]
    big_b = torch.zeros(2, L, 3, 40 + 7, 16, device=device)      # [pad, L, slice, N+pad, R]
    views_a, views_b = [], []
    for s, (a, b) in enumerate(zip(p.lora_a, p.lora_b)):
        big_a[:, s, 1].copy_(a)
        big_b[1, :, s, :b.shape[1]].copy_(b)
        views_a.append(big_a[:, s, 1])
        views_b.append(big_b[1, :, s, :b.shape[1]])
    assert not views_a[0].is_contiguous() and not views_b[0].is_contiguous()
    plan = dec.decode_plan(7, L, 72, 16, WIDTHS, torch.device(device))
    assert (plan is not None) == decode
    y = p.y.clone()
    triton_ops.add_lora(y, p.x, views_a, views_b, p.meta, p.offsets)
    _check(p, y, torch.float32)
    assert rel_error(y, _run(torch_ops, p)) < 1e-5


# ---- folded shrink (engine.lora.slot_layout fold): the base matmul already made x·Aᵀ ---------

@pytest.mark.parametrize("path", ["decode", "two_launch"])
@pytest.mark.parametrize("mix,num_tokens", [("distinct", 7), ("skewed", 33), ("some_without", 9),
                                            ("all_without", 3)])
def test_expand_of_folded_products_matches_loop(mix, num_tokens, path, monkeypatch, device):
    # W with every slot's A rows below it: one matmul gives [base | x·A_s[l]ᵀ for all s, l];
    # add_lora_folded picks each token's slot columns and expands them into the base part.
    _use_path(monkeypatch, path)
    widths = [200, 72, 40]
    p = make_problem(num_tokens=num_tokens, hidden=100, widths=widths, max_rank=16,
                     ranks=[16, 8, 1], mix=mix, dtype=torch.float32, device=device)
    L, N = p.meta.max_loras, sum(widths)
    w = torch.randn(N, 100, device=device) * 0.1
    ext = torch.cat([w] + [a.reshape(L * 16, 100) for a in p.lora_a])      # [N + S*L*R, H]
    out = p.x @ ext.t()
    p.y = out[:, :N].clone()                                                # the base output
    y = out[:, :N]                                                          # a strided view
    triton_ops.add_lora_folded(y, out[:, N:], p.lora_b, p.meta, p.offsets, hidden=100)
    _check(p, y, torch.float32)


def test_folded_products_of_the_wrong_shape_are_refused(device):
    p = make_problem(num_tokens=4, hidden=16, widths=[24], max_rank=8, ranks=[8],
                     mix="uniform", dtype=torch.float32, device=device)
    inter = torch.zeros(4, 8, device=device)                  # one slot's worth, not L * R
    with pytest.raises(ValueError, match=r"inter must be \[T=4, 40\]"):
        triton_ops.add_lora_folded(p.y, inter, p.lora_b, p.meta, p.offsets, hidden=16)
