"""Flash-decode attention over a paged KV cache against a per-row torch reference."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from lorry.kernels.decode_attention import decode_attention, decode_attention_ref, num_splits
from tests.kernels.cases import check_attention, check_huge_queries_over_fp8, skip_interpreted_bf16


@dataclass
class Paged:
    """One decode step's inputs: strided q, paged caches, shuffled block tables."""

    q: torch.Tensor              # [B, h*D], the q part of fused q/k/v rows
    k_cache: torch.Tensor        # [num_slots, kvh, D]
    v_cache: torch.Tensor
    tables: torch.Tensor         # [B, max_blocks] int32
    positions: torch.Tensor      # [B]
    block_size: int
    heads: int

    def run(self, splits=None, **kw) -> torch.Tensor:
        return decode_attention(self.q, self.k_cache, self.v_cache, self.tables,
                                self.positions, self.block_size, splits, **kw)

    def ref(self, **kw) -> torch.Tensor:
        B = self.q.shape[0]
        q = self.q.reshape(B, self.heads, -1)
        return decode_attention_ref(q, self.k_cache, self.v_cache, self.tables, self.positions,
                                    self.block_size, **kw).reshape(B, -1)

    def visible_slots(self, window=None) -> torch.Tensor:
        """Slots of the keys some query attends to -> bool [num_slots]."""
        seen = torch.zeros(self.k_cache.shape[0], dtype=torch.bool, device=self.q.device)
        for b, pos in enumerate(self.positions.tolist()):
            p = torch.arange(max(0, pos - window + 1) if window else 0, pos + 1,
                             device=self.q.device)
            seen[self.tables[b, p // self.block_size].long() * self.block_size
                 + p % self.block_size] = True
        return seen


def _paged(B, heads, kvh, D, block_size, max_blocks, dtype, device, seed) -> Paged:
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, (heads + 2 * kvh) * D, generator=g).to(dtype).to(device)
    num_blocks = 1 + B * max_blocks + 3          # block 0 is the null block; 3 are free
    kc = torch.randn(num_blocks * block_size, kvh, D, generator=g).to(dtype).to(device)
    vc = torch.randn(num_blocks * block_size, kvh, D, generator=g).to(dtype).to(device)
    # each row holds its own blocks, shuffled over the whole cache
    ids = torch.randperm(num_blocks - 1, generator=g) + 1
    tables, free = ids[:B * max_blocks].view(B, max_blocks), ids[B * max_blocks:]
    max_len = max_blocks * block_size
    pos = torch.randint(0, max_len, (B,), generator=g)
    pos[0] = 0                                   # a single key
    pos[-1] = max_len - 1                        # every block of the table, the last one full
    if B > 2:
        pos[1] = min(block_size, max_len - 1)    # the first key of a second block
    # entries past a row's last block are padding: the null block or free blocks
    past = torch.arange(max_blocks)[None, :] > (pos // block_size)[:, None]
    pad = torch.cat([torch.zeros(1, dtype=ids.dtype), free])[
        torch.randint(0, 1 + len(free), tables.shape, generator=g)]
    tables = torch.where(past, pad, tables).int()
    return Paged(qkv[:, :heads * D], kc, vc, tables.to(device), pos.to(device), block_size,
                 heads)


# (B, heads, kvh, D, block_size, max_blocks)
SHAPES = {
    "gqa_tile_spans_blocks": (3, 4, 2, 16, 16, 3),
    "mha_one_key_blocks": (5, 6, 6, 24, 1, 70),
    "mqa_block_spans_tiles": (4, 8, 1, 32, 128, 2),
    "llama3_block_is_tile": (7, 32, 8, 128, 64, 3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_decode_attention_matches_reference(dtype, shape, device):
    skip_interpreted_bf16(dtype, device)
    p = _paged(*SHAPES[shape], dtype=dtype, device=device, seed=sum(SHAPES[shape]))
    check_attention(p.run(), p.ref(), dtype)


@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forced_splits_merge_to_the_reference(dtype, block_size, device):
    skip_interpreted_bf16(dtype, device)
    # 512 keys in 4 splits of 128: the 1-key row leaves three splits empty, the full row none
    p = _paged(3, 8, 2, 32, block_size, 512 // block_size, dtype, device, seed=block_size)
    ref = p.ref()
    outs = {splits: p.run(splits) for splits in (1, 2, 4)}
    for out in outs.values():
        check_attention(out, ref, dtype)
    check_attention(outs[4], outs[1], dtype)


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_reads_only_the_visible_keys_through_the_block_table(block_size, window, device):
    # NaN in every slot no query may read: free and null blocks, the slots past each row's
    # position, keys older than the window, and the blocks that padding entries point at
    p = _paged(4, 4, 2, 16, block_size, 320 // block_size, torch.float32, device,
               seed=block_size)
    ref = p.ref(window=window)
    hidden = ~p.visible_slots(window)
    assert hidden.any()
    p.k_cache[hidden] = float("nan")
    p.v_cache[hidden] = float("nan")
    for splits in (1, 4):
        out = p.run(splits, window=window)
        assert torch.isfinite(out).all()
        check_attention(out, ref, torch.float32)


@pytest.mark.parametrize("window, softcap, splits", [(5, None, 1), (1, None, 1), (40, None, 4),
                                                     (None, 2.0, 1), (7, 1.5, 2)])
def test_sliding_window_scale_and_softcap_match_reference(window, softcap, splits, device):
    # keys older than the window are skipped (whole splits of them with several splits);
    # a custom scale (Gemma's query_pre_attn_scalar) and soft-capped logits
    p = _paged(4, 4, 2, 16, 16, 19, torch.float32, device, seed=3)
    kw = {"scale": 0.3, "window": window, "softcap": softcap}
    out = p.run(splits, **kw)
    check_attention(out, p.ref(**kw), torch.float32)
    full = p.ref(scale=0.3, softcap=softcap)
    assert window is None or (out - full).abs().max() > 1e-3   # the window changes the result


@pytest.mark.parametrize("window", [None, 1, 5, 24, 200])
@pytest.mark.parametrize("splits", [2, 4, 8])
def test_splits_without_keys_are_never_read(window, splits, device, monkeypatch):
    """A split with no keys of its row (past the row's position, or before its window) stores
    no partial, and the merge must not read one: every buffer the call allocates starts as
    NaN here, so a partial read that was never written shows."""
    import lorry.kernels.decode_attention as da

    p = _paged(5, 4, 2, 16, 16, 512 // 16, torch.float32, device, seed=splits)
    p.positions[2] = 512 // splits - 1                          # the last key of split 0
    p.positions[3] = 512 // splits                               # the first key of split 1
    ref = p.ref(window=window)
    empty = torch.empty

    def poisoned(*shape, **kw):
        t = empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(da.torch, "empty", poisoned)
    out = p.run(splits, window=window)
    monkeypatch.undo()
    assert torch.isfinite(out).all()
    check_attention(out, ref, torch.float32)


def test_split_keys_splits_long_tables_of_a_full_batch(monkeypatch):
    """SPLIT_KEYS: a batch that fills the chip by itself still splits its tables so that no
    split spans more keys than that; 0 turns it off."""
    import lorry.kernels.decode_attention as da

    cpu = torch.device("cpu")
    monkeypatch.setattr(da, "SPLIT_KEYS", 0)
    assert num_splits(256, 8, 5120, cpu) == 1
    monkeypatch.setattr(da, "SPLIT_KEYS", 1280)
    monkeypatch.setattr(da, "KEY_SPLITS_MAX", 8)
    assert num_splits(256, 8, 5120, cpu) == 4
    assert num_splits(256, 8, 1024, cpu) == 1                   # short tables: one split
    assert num_splits(256, 8, 5000, cpu) == 4                   # a power of two
    monkeypatch.setattr(da, "KEY_SPLITS_MAX", 2)
    assert num_splits(256, 8, 5120, cpu) == 2                   # capped


def test_full_batches_split_long_tables_in_two_by_default():
    """The default measured on the bulk workload (2,000 requests, 5,120-key tables, H100):
    a full batch's tables split in two where they hold more than 2,560 keys, never more
    splits however long the table (a 32k table's splits would mostly be empty)."""
    cpu = torch.device("cpu")
    assert num_splits(256, 8, 5120, cpu) == 2
    assert num_splits(256, 8, 4096, cpu) == 2
    assert num_splits(256, 8, 2048, cpu) == 1
    assert num_splits(256, 8, 32768, cpu) == 2
    assert num_splits(64, 8, 256, cpu) == 1                     # the 128->128 benchmark


@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_wide_launch_matches_the_reference_in_and_across_splits(dtype, block_size, device,
                                                                   monkeypatch):
    """128-key tiles in three stages (the launch head dims <= 128 take on an H100): splits
    rounded to 128 keys, a table of 2.5 tiles, rows ending inside a tile."""
    import lorry.kernels.decode_attention as da

    skip_interpreted_bf16(dtype, device)
    monkeypatch.setattr(da, "BLOCK_N", 128)
    monkeypatch.setattr(da, "NUM_STAGES", 3)
    p = _paged(4, 8, 2, 64, block_size, 640 // block_size, dtype, device, seed=7 + block_size)
    ref = p.ref()
    for splits in (1, 2, 4):
        check_attention(p.run(splits), ref, dtype)


def test_the_launch_follows_table_head_dim_dtype_and_shared_memory(monkeypatch):
    """Wide tiles only for long tables (the bulk workload's 5,120 keys, not the 128->128
    benchmark's 264) where three stages of K and V tiles fit the device's shared memory:
    Llama's head dim 128 in bf16 on an H100 (227 KiB); not Gemma-2's 256, not an fp32 cache,
    not head dim 128 on an A100 (163 KiB), and never the CPU interpreter."""
    import lorry.kernels.decode_attention as da

    cpu = torch.device("cpu")
    assert da.launch_for(128, torch.bfloat16, cpu, 5120) == da.NARROW    # interpreter
    h100, a100 = 232448, 166912
    monkeypatch.setattr(da, "max_shared_mem", lambda device: h100)
    assert da.launch_for(128, torch.bfloat16, cpu, 5120) == da.WIDE == (128, 3)
    assert da.launch_for(128, torch.bfloat16, cpu, 2048) == da.WIDE
    assert da.launch_for(128, torch.bfloat16, cpu, 264) == da.NARROW
    assert da.launch_for(64, torch.float16, cpu, 4096) == da.WIDE
    assert da.launch_for(256, torch.bfloat16, cpu, 5120) == da.NARROW == (64, 2)
    assert da.launch_for(128, torch.float32, cpu, 5120) == da.NARROW
    monkeypatch.setattr(da, "max_shared_mem", lambda device: a100)
    assert da.launch_for(128, torch.bfloat16, cpu, 5120) == da.NARROW
    assert da.launch_for(64, torch.bfloat16, cpu, 5120) == da.WIDE
    monkeypatch.setattr(da, "BLOCK_N", 32)                               # an A/B's override
    monkeypatch.setattr(da, "NUM_STAGES", 4)
    assert da.launch_for(256, torch.bfloat16, cpu, 264) == (32, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reads a CUDA device's limits")
def test_head_dim_128_takes_the_wide_launch_where_the_device_holds_it():
    """On an H100/H200 (227 KiB a program) head dim 128 in bf16 takes the wide launch; a
    GPU with less shared memory (an A100's 163 KiB) the narrow one; and the launch runs."""
    import lorry.kernels.decode_attention as da
    from lorry.kernels.device_info import max_shared_mem

    dev = torch.device("cuda")
    wide = max_shared_mem(dev) >= 3 * 2 * 128 * 128 * 2 + 16 * 1024
    if torch.cuda.get_device_capability() == (9, 0):
        assert max_shared_mem(dev) == 227 * 1024 and wide
    assert da.launch_for(128, torch.bfloat16, dev, 5120) == (da.WIDE if wide else da.NARROW)
    assert da.launch_for(128, torch.bfloat16, dev, 264) == da.NARROW
    assert da.launch_for(256, torch.bfloat16, dev, 5120) == da.NARROW
    p = _paged(4, 32, 8, 128, 16, 2048 // 16, torch.bfloat16, dev, seed=3)
    check_attention(p.run(), p.ref(), torch.bfloat16)


def test_num_splits_fills_the_chip_only_for_long_tables():
    cpu = torch.device("cpu")                                   # 8 "SMs" off CUDA
    assert num_splits(64, 8, 264, cpu) == 1                     # many rows, short tables
    s = num_splits(1, 2, 4096, cpu)
    assert s > 1 and s & (s - 1) == 0                          # a power of two
    assert num_splits(1, 2, 300, cpu) == 1                      # too short to split


@pytest.mark.parametrize("what, match", [("q", "q width"), ("block_size", "block_size 24"),
                                         ("tables", "block_tables must be"),
                                         ("static_cache", "caches must be"),
                                         ("splits", "splits must be a power of two")])
def test_refuses_inputs_it_cannot_attend_over(what, match, device):
    kc = torch.zeros(4 * 16, 2, 16, device=device)
    args = {"q": torch.zeros(2, 64, device=device), "k_cache": kc, "v_cache": kc,
            "block_tables": torch.zeros(2, 4, dtype=torch.int32, device=device),
            "positions": torch.zeros(2, dtype=torch.long, device=device), "block_size": 16}
    bad = {"q": ("q", torch.zeros(2, 40, device=device)), "block_size": ("block_size", 24),
           "tables": ("block_tables", torch.zeros(3, 4, dtype=torch.int32, device=device)),
           "static_cache": ("k_cache", torch.zeros(2, 2, 32, 16, device=device)),
           "splits": ("splits", 3)}[what]
    args[bad[0]] = bad[1]
    with pytest.raises(ValueError, match=match):
        decode_attention(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("splits", [None, 4])
def test_graph_replay_follows_new_tables_and_positions(splits):
    # captured once, replayed after the step's inputs changed in place: nothing the launch
    # reads on the host depends on the tables' or positions' contents
    dev = torch.device("cuda")
    a = _paged(6, 8, 2, 64, 16, 32, torch.bfloat16, dev, seed=1)
    b = _paged(6, 8, 2, 64, 16, 32, torch.bfloat16, dev, seed=2)
    a.run(splits)                                               # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = a.run(splits)
    for name in ("q", "k_cache", "v_cache", "tables", "positions"):
        getattr(a, name).copy_(getattr(b, name))
    graph.replay()
    check_attention(out, b.ref(), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["gqa_tile_spans_blocks", "llama3_block_is_tile"])
def test_an_fp8_cache_is_read_widened_to_the_query_dtype(dtype, shape, device):
    # EngineConfig.kv_cache_dtype="fp8": the caches hold float8 e4m3 (values up to ~+-12
    # here, rounded to 3 mantissa bits), the kernel widens each tile: to fp32 for an fp32
    # query, to fp16 for a bf16 one (whose dots then run in fp16: paged_tiles.query_compute;
    # the interpreter runs those, unlike bf16 dots)
    p = _paged(*SHAPES[shape], dtype=dtype, device=device, seed=7)
    p.k_cache, p.v_cache = (c.mul(3).to(torch.float8_e4m3fn) for c in (p.k_cache, p.v_cache))
    out = p.run()
    check_attention(out, p.ref(), dtype)
    if dtype == torch.float32:
        # the same as the model-dtype kernel over the same (rounded) keys: widening is exact;
        # on a GPU the two compile to different MMA operand paths (registers against shared
        # memory), which may sum a dot product in another order: equal within the rounding
        same = decode_attention(p.q, p.k_cache.to(dtype), p.v_cache.to(dtype), p.tables,
                                p.positions, p.block_size)
        if device.type == "cpu":
            assert torch.equal(out, same)
        else:
            check_attention(out, same, dtype)


@pytest.mark.parametrize("shape", ["gqa_tile_spans_blocks", "llama3_block_is_tile"])
def test_a_bf16_query_past_fp16s_range_over_an_fp8_cache_stays_finite(shape, device):
    check_huge_queries_over_fp8(_paged(*SHAPES[shape], dtype=torch.bfloat16, device=device,
                                       seed=8))
