"""Flash-decode attention over the static KV cache against the model's torch decode path."""
from __future__ import annotations

import pytest
import torch

from lorry.kernels.decode_attention import decode_attention, decode_attention_ref, num_splits

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def _problem(B, heads, kvh, D, L, R, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    # q is the strided q part of a fused q/k/v row, as in the model
    qkv = torch.randn(B, (heads + 2 * kvh) * D, generator=g).to(dtype).to(device)
    kc = torch.randn(R, kvh, L, D, generator=g).to(dtype).to(device)
    vc = torch.randn(R, kvh, L, D, generator=g).to(dtype).to(device)
    rows = torch.randperm(R, generator=g)[:B].to(device)
    pos = torch.randint(0, L, (B,), generator=g)
    pos[0] = 0                                                  # a row with a single key
    pos[-1] = L - 1                                             # and one over the whole cache
    return qkv[:, :heads * D], kc, vc, rows, pos.to(device)


def _skip_interpreted_bf16(dtype, device):
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton 3.x's CPU interpreter multiplies bf16 dot operands as raw bits")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,heads,kvh,D,L", [(3, 4, 2, 16, 20), (5, 6, 6, 24, 70),
                                              (7, 32, 8, 128, 130)])
def test_decode_attention_matches_torch_path(dtype, B, heads, kvh, D, L, device):
    _skip_interpreted_bf16(dtype, device)
    q, kc, vc, rows, pos = _problem(B, heads, kvh, D, L, R=B + 2, dtype=dtype, device=device,
                                    seed=B * L)
    out = decode_attention(q, kc, vc, rows, pos)
    ref = decode_attention_ref(q.reshape(B, heads, D), kc, vc, rows, pos).reshape(B, -1)
    assert out.shape == (B, heads * D) and out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("splits", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_sequence_merges_to_the_same_result(splits, dtype, device):
    _skip_interpreted_bf16(dtype, device)
    # long cache, few rows: the sequence is split, short rows leave later splits empty
    B, heads, kvh, D, L = 3, 8, 2, 32, 300
    q, kc, vc, rows, pos = _problem(B, heads, kvh, D, L, R=4, dtype=dtype, device=device, seed=9)
    ref = decode_attention_ref(q.reshape(B, heads, D), kc, vc, rows, pos).reshape(B, -1)
    one = decode_attention(q, kc, vc, rows, pos, splits=1)
    many = decode_attention(q, kc, vc, rows, pos, splits=splits)
    assert _rel(many, ref) < TOL[dtype]
    assert _rel(many, one) < TOL[dtype]


def test_keys_past_the_position_are_never_read(device):
    # NaN garbage past each row's position must not leak into the output
    B, heads, kvh, D, L = 4, 4, 2, 16, 128
    q, kc, vc, rows, pos = _problem(B, heads, kvh, D, L, R=4, dtype=torch.float32,
                                    device=device, seed=5)
    ref = decode_attention_ref(q.reshape(B, heads, D), kc, vc, rows, pos).reshape(B, -1)
    for b in range(B):
        kc[rows[b], :, pos[b] + 1:] = float("nan")
        vc[rows[b], :, pos[b] + 1:] = float("nan")
    for splits in (1, 2):
        out = decode_attention(q, kc, vc, rows, pos, splits=splits)
        assert torch.isfinite(out).all()
        assert _rel(out, ref) < 1e-5


def test_num_splits_fills_the_chip_only_for_long_caches():
    cpu = torch.device("cpu")                                   # 8 "SMs" off CUDA
    assert num_splits(64, 8, 264, cpu) == 1                     # many rows, short cache
    s = num_splits(1, 2, 4096, cpu)
    assert s > 1 and s & (s - 1) == 0                          # a power of two
    assert num_splits(1, 2, 300, cpu) == 1                      # too short to split


def test_refuses_a_q_width_that_is_not_heads_times_head_dim(device):
    kc = torch.zeros(2, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match="q width"):
        decode_attention(torch.zeros(1, 40, device=device), kc, kc,
                         torch.zeros(1, dtype=torch.long, device=device),
                         torch.zeros(1, dtype=torch.long, device=device))


@pytest.mark.parametrize("window, softcap, splits", [(5, None, 1), (1, None, 1), (40, None, 4),
                                                     (None, 2.0, 1), (7, 1.5, 2)])
def test_sliding_window_scale_and_softcap_match_torch_path(window, softcap, splits, device):
    # keys older than the window are skipped (whole splits of them with several splits);
    # a custom scale (Gemma's query_pre_attn_scalar) and soft-capped logits as the model's
    B, heads, kvh, D, L = 4, 4, 2, 16, 300
    q, kc, vc, rows, pos = _problem(B, heads, kvh, D, L, R=5, dtype=torch.float32,
                                    device=device, seed=3)
    kw = {"scale": 0.3, "window": window, "softcap": softcap}
    ref = decode_attention_ref(q.reshape(B, heads, D), kc, vc, rows, pos, **kw).reshape(B, -1)
    full = decode_attention_ref(q.reshape(B, heads, D), kc, vc, rows, pos, scale=0.3,
                                softcap=softcap).reshape(B, -1)
    out = decode_attention(q, kc, vc, rows, pos, splits=splits, **kw)
    assert _rel(out, ref) < TOL[torch.float32]
    assert window is None or _rel(out, full) > 1e-3        # the window changes the result
