"""Paged prefill attention (prompts, and chunks after cached keys) against a per-query torch reference."""
from __future__ import annotations

import pytest
import torch

from lorry.kernels import prefill_attention as pa
from lorry.kernels.prefill_attention import BLOCK_M, prefill_attention, prefill_attention_ref
from tests.kernels.cases import check_attention, check_huge_queries_over_fp8, skip_interpreted_bf16


class Chunks:
    """One prefill step: B rows of chunks (lengths ``lens``) starting after ``starts`` cached
    keys over a shuffled paged cache that already holds every chunk's own keys; the queries
    packed (the real tokens one after another) or right-padded to S (``padded``)."""

    def __init__(self, starts, lens, heads, kvh, D, block_size, dtype, device, seed,
                 padded=False):
        g = torch.Generator().manual_seed(seed)
        B, S = len(lens), max(lens)
        self.heads, self.block_size, self.S, self.padded = heads, block_size, S, padded
        ends = [a + n for a, n in zip(starts, lens)]
        max_blocks = -(-max(ends) // block_size)
        num_blocks = 1 + B * max_blocks + 3      # block 0 is the null block; 3 are free
        self.k_cache = torch.randn(num_blocks * block_size, kvh, D, generator=g).to(dtype).to(device)
        self.v_cache = torch.randn(num_blocks * block_size, kvh, D, generator=g).to(dtype).to(device)
        ids = (torch.randperm(num_blocks - 1, generator=g) + 1)[:B * max_blocks]
        tables = ids.view(B, max_blocks).clone()
        for b, e in enumerate(ends):             # past a row's last block: the null block
            tables[b, -(-e // block_size):] = 0
        self.tables = tables.int().to(device)
        q_start = [b * S if padded else sum(lens[:b]) for b in range(B)]
        self.rows = torch.tensor([q_start, lens, starts], dtype=torch.int32, device=device)
        Tq = B * S if padded else sum(lens)
        qkv = torch.randn(Tq, (heads + 2 * kvh) * D, generator=g).to(dtype).to(device)
        self.q = qkv[:, :heads * D]                 # strided rows, as the fused q/k/v's q
        self.lens, self.ends, self.starts = lens, ends, starts

    def run(self, **kw):
        return prefill_attention(self.q, self.k_cache, self.v_cache, self.tables, self.rows,
                                 self.S, self.block_size, row_stride=self.S if self.padded else 0,
                                 **kw)

    def ref(self, **kw):
        q = self.q.reshape(self.q.shape[0], self.heads, -1)
        return prefill_attention_ref(q, self.k_cache, self.v_cache, self.tables, self.rows,
                                     self.block_size, self.S if self.padded else 0,
                                     **kw).reshape(q.shape[0], -1)

    def real(self) -> torch.Tensor:
        """Rows of q that hold a query (all of them when packed)."""
        if not self.padded:
            return torch.arange(self.q.shape[0])
        return torch.tensor([b * self.S + i for b, n in enumerate(self.lens) for i in range(n)])

    def visible_slots(self, window=None) -> torch.Tensor:
        seen = torch.zeros(self.k_cache.shape[0], dtype=torch.bool)
        for b, (a, e) in enumerate(zip(self.starts, self.ends)):
            p = torch.arange(max(0, a - window + 1) if window else 0, e)
            seen[self.tables[b, p // self.block_size].long().cpu() * self.block_size
                 + p % self.block_size] = True
        return seen.to(self.k_cache.device)


# (starts, lens, heads, kvh, D, block_size)
CASES = {
    # a whole prompt, a chunk after a cached prefix, a one-token chunk; GQA; tiles span blocks
    "gqa_mixed_rows": ([0, 37, 100], [70, 9, 1], 4, 2, 16, 16),
    # block size 1 (every key its own block), MHA, a head_dim that is not a power of two
    "mha_one_key_blocks": ([5, 0], [3, 20], 6, 6, 24, 1),
    # MQA, blocks spanning key tiles, a long row whose padding covers whole query tiles
    "mqa_long_and_short": ([130, 0, 64], [2 * BLOCK_M + 5, 1, 17], 8, 1, 32, 128),
    # Llama-3's heads; block size = key tile
    "llama3_heads": ([0, 200], [40, 33], 32, 8, 128, 64),
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_attention_matches_reference(case, dtype, padded, device):
    skip_interpreted_bf16(dtype, device)
    c = Chunks(*CASES[case], dtype=dtype, device=device, seed=len(case), padded=padded)
    out, ref = c.run(), c.ref()
    check_attention(out, ref, dtype)
    real = torch.zeros(out.shape[0], dtype=torch.bool)
    real[c.real()] = True
    assert padded == (not real.all())
    assert (out[~real.to(device)] == 0).all()        # padding rows are left alone


@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize("block_size", [1, 16, 128])
def test_reads_only_the_visible_keys_through_the_block_table(block_size, window, device):
    # NaN in every slot no query may read: the free and null blocks, slots past each row's
    # last position, keys older than every query's window
    c = Chunks([50, 0, 300], [30, 90, 7], 4, 2, 16, block_size, torch.float32, device,
               seed=block_size, padded=True)
    ref = c.ref(window=window)
    hidden = ~c.visible_slots(window)
    assert hidden.any()
    c.k_cache[hidden] = float("nan")
    c.v_cache[hidden] = float("nan")
    out = c.run(window=window)
    assert torch.isfinite(out).all()
    check_attention(out, ref, torch.float32)


@pytest.mark.parametrize("window, softcap", [(5, None), (1, None), (100, None), (None, 2.0),
                                             (7, 1.5)])
def test_sliding_window_scale_and_softcap_match_reference(window, softcap, device):
    c = Chunks([0, 150, 40], [80, 70, 3], 4, 2, 16, 16, torch.float32, device, seed=3)
    kw = {"scale": 0.3, "window": window, "softcap": softcap}
    out = c.run(**kw)
    check_attention(out, c.ref(**kw), torch.float32)
    full = c.ref(scale=0.3, softcap=softcap)
    assert window is None or (out - full).abs().max() > 1e-3   # the window matters


@pytest.mark.parametrize("what, match", [("q", "q width"), ("block_size", "block_size 24"),
                                         ("tables", "block_tables must be"),
                                         ("rows", "rows must be"),
                                         ("static_cache", "caches must be")])
def test_refuses_inputs_it_cannot_attend_over(what, match, device):
    kc = torch.zeros(4 * 16, 2, 16, device=device)
    args = {"q": torch.zeros(6, 64, device=device), "k_cache": kc, "v_cache": kc,
            "block_tables": torch.zeros(2, 4, dtype=torch.int32, device=device),
            "rows": torch.zeros(3, 2, dtype=torch.int32, device=device), "max_q": 3,
            "block_size": 16}
    bad = {"q": ("q", torch.zeros(6, 40, device=device)), "block_size": ("block_size", 24),
           "tables": ("block_tables", torch.zeros(3, 4, dtype=torch.int32, device=device)),
           "rows": ("rows", torch.zeros(2, 2, dtype=torch.int32, device=device)),
           "static_cache": ("k_cache", torch.zeros(2, 2, 32, 16, device=device))}[what]
    args[bad[0]] = bad[1]
    with pytest.raises(ValueError, match=match):
        prefill_attention(**args)


@pytest.mark.parametrize("fp8_launch", ["tuned", "16-bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_fp8_cache_is_read_widened_to_the_query_dtype(dtype, fp8_launch, device,
                                                         monkeypatch):
    # EngineConfig.kv_cache_dtype="fp8": cached prefixes and the chunk's own keys in e4m3,
    # widened to fp32 for an fp32 query, to fp16 for a bf16 one (whose dots then run in fp16:
    # paged_tiles.query_compute; the interpreter runs those, unlike bf16 dots); under the
    # fp8 cache's own launch settings (FP8_LAUNCH) and the 16-bit caches'
    if fp8_launch == "16-bit":
        monkeypatch.setattr(pa, "FP8_LAUNCH", None)
    c = Chunks(*CASES[list(CASES)[-1]], dtype=dtype, device=device, seed=3)
    c.k_cache, c.v_cache = (x.mul(3).to(torch.float8_e4m3fn) for x in (c.k_cache, c.v_cache))
    out = c.run()
    check_attention(out, c.ref(), dtype)
    if dtype == torch.float32 and fp8_launch == "16-bit":    # the same tiles either way
        wide = prefill_attention(c.q, c.k_cache.to(dtype), c.v_cache.to(dtype), c.tables,
                                 c.rows, c.S, c.block_size)
        assert torch.equal(out, wide)                 # widening is exact


def test_a_bf16_query_past_fp16s_range_over_an_fp8_cache_stays_finite(device):
    check_huge_queries_over_fp8(Chunks(*CASES["gqa_mixed_rows"], dtype=torch.bfloat16,
                                       device=device, seed=4))


@pytest.mark.parametrize("max_pack", [1, 2, 8])
@pytest.mark.parametrize("window", [None, 24])
def test_every_packing_of_grouped_heads_gives_the_same_attention(max_pack, window, device,
                                                                 monkeypatch):
    # a program takes up to MAX_PACK query heads of one kv head (rows = queries x heads):
    # one head a program, pairs, and all eight of an MQA group, each with a sliding window
    monkeypatch.setattr(pa, "MAX_PACK", max_pack)
    assert pa.heads_packed(8) == max_pack
    c = Chunks([130, 0, 64], [70, 1, 17], 8, 1, 32, 16, torch.float32, device, seed=max_pack)
    check_attention(c.run(window=window), c.ref(window=window), torch.float32)
