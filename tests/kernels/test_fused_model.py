"""The model's Triton path (fused norms, rotary + cache write, flash-decode, silu*up) equals
its torch path over a prefill and several decode steps, logits and KV cache alike.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py); the engine itself only takes
the Triton path on CUDA, so this test calls it directly.
"""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig

from lorry.engine.model.llama import Batch, LlamaForCausalLM
from tests.kernels.cases import skip_interpreted_bf16

# bases whose blocks the Triton path serves: per-head q/k norms (qwen3), a sliding window
# shorter than the steps below (mistral), fused checkpoint projections + longrope (phi3)
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
            "short_factor": [1.0, 1.2, 1.5, 2.0, 2.0, 2.5, 3.0, 4.0],
            "long_factor": [1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]}
BS = 4   # tokens per KV block: prompts and decode steps cross block boundaries
BASES = {"llama": {}, "qwen3": {"head_dim": 24}, "mistral": {"sliding_window": 4},
         "phi3": {"rope_parameters": LONGROPE, "original_max_position_embeddings": 8}}


def _model(device, dtype, base="llama"):
    cfg = AutoConfig.for_model(base, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                               max_position_embeddings=64, rms_norm_eps=1e-5, **BASES[base])
    model = LlamaForCausalLM(cfg, max_len=64)
    assert model.use_triton_ops
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.1) + (p.dim() == 1))
    model = model.to(device=device, dtype=dtype)
    model.allocate_kv_cache(num_blocks=17, block_size=BS)
    return model


def _check(got, want, dtype):
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype], rel


def _paged(batch, tables, lens, starts):
    """``batch`` (a prefill step) with what the paged prefill kernel reads, as the runner
    gives it: block tables, each row's queries (start among the real tokens, count, first
    position), the real tokens' positions and KV slots."""
    dev = batch.positions.device
    batch.block_tables = tables
    batch.rows = torch.tensor([[sum(lens[:b]) for b in range(len(lens))], lens, starts],
                              dtype=torch.int32, device=dev)
    flat = batch.positions.reshape(-1)
    idx = batch.pad_index
    batch.token_positions = flat if idx is None else flat.index_select(0, idx)
    batch.token_slots = batch.slot_mapping if idx is None else \
        batch.slot_mapping.index_select(0, idx)
    return batch


def _fused(model, ids, batch, last):
    flat = ids.reshape(-1)
    x = model.embed_tokens(flat if batch.pad_index is None else flat[batch.pad_index])
    return model._forward_fused(x, batch, last, *ids.shape)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@torch.inference_mode()
def test_triton_path_equals_torch_path(dtype, base, device):
    skip_interpreted_bf16(dtype, device)
    ref = _model(device, dtype, base)
    tri = copy.deepcopy(ref)
    B, S = 3, 6
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (B, S), generator=g).to(device)
    lens = torch.tensor([6, 2, 4], device=device)                # padded prompts
    # each row's blocks scattered over the pool, out of order (block 0: the null block)
    tables = torch.tensor([[9, 3, 14], [5, 16, 1], [12, 7, 2]], dtype=torch.int32,
                          device=device)
    positions = torch.minimum(torch.arange(S, device=device)[None, :], lens[:, None] - 1)

    def slots(pos, valid):                                       # pos: [B, S] -> [B*S]
        blk = tables.long().gather(1, pos // BS)
        return torch.where(valid, blk * BS + pos % BS, torch.zeros_like(pos)).reshape(-1)

    valid = torch.arange(S, device=device)[None, :] < lens[:, None]
    last = lens - 1
    pre = _paged(Batch(positions=positions, slot_mapping=slots(positions, valid), prefill=True,
                       block_size=BS), tables, lens.tolist(), [0] * B)
    want, got = ref(ids, pre, last), _fused(tri, ids, pre, last)
    _check(got, want, dtype)
    # the same prefill with the padding rows left out of the layers (packed tokens)
    packed = _paged(Batch(positions=positions, slot_mapping=pre.slot_mapping, prefill=True,
                          block_size=BS, pad_index=valid.reshape(-1).nonzero()[:, 0]),
                    tables, lens.tolist(), [0] * B)
    _check(_fused(tri, ids, packed, last), want, dtype)
    _check(ref(ids, packed, last), want, dtype)
    pos = lens.clone()
    for step in range(4):                                        # decode: one token per row
        nxt = want.argmax(-1)
        p = pos[:, None]
        batch = Batch(positions=p, slot_mapping=slots(p, p >= 0), prefill=False,
                      block_tables=tables, block_size=BS, kv_len=int(pos.max()) + 1)
        want = ref(nxt[:, None], batch, torch.zeros(B, dtype=torch.long, device=device))
        got = _fused(tri, nxt[:, None], batch, torch.zeros(B, dtype=torch.long, device=device))
        assert got.shape == want.shape == (B, 128)
        _check(got, want, dtype)
        pos += 1
    for a, b in zip(ref.layers, tri.layers):                     # the decode steps' K/V landed
        for r in range(B):
            n = int(pos[r])
            idx = slots(torch.arange(n, device=device)[None, :].expand(B, n),
                        torch.ones(B, n, dtype=torch.bool, device=device)).view(B, n)[r]
            _check(b.self_attn.k_cache[idx], a.self_attn.k_cache[idx], dtype)
            _check(b.self_attn.v_cache[idx], a.self_attn.v_cache[idx], dtype)


@pytest.mark.parametrize("base", ["gemma2", "olmo2"])
@torch.inference_mode()
def test_torch_path_decode_through_flash_decode_equals_its_own_attention(base, device,
                                                                         monkeypatch):
    """Bases whose layers run the torch code (Gemma 2: soft-capping and windows; OLMo 2)
    decode through the Triton flash-decode kernel on CUDA: the same logits as the torch
    attention over gathered keys, across block boundaries."""
    from lorry.engine.model import attention

    extra = ({"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 5,
              "attn_logit_softcapping": 3.0} if base == "gemma2" else {})
    cfg = AutoConfig.for_model(base, hidden_size=64, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=96,
                               num_hidden_layers=2, vocab_size=128,
                               max_position_embeddings=64, **extra)
    model = LlamaForCausalLM(cfg, max_len=64)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.1))
    model = model.to(device=device, dtype=torch.float32)
    model.allocate_kv_cache(num_blocks=17, block_size=BS)
    tables = torch.tensor([[9, 3, 14], [5, 16, 1]], dtype=torch.int32, device=device)
    B, S = 2, 7
    ids = torch.randint(0, 128, (B, S), generator=g).to(device)
    pos = torch.arange(S, device=device)[None, :].expand(B, S)
    slots = (tables.long().gather(1, pos // BS) * BS + pos % BS).reshape(-1)
    model(ids, Batch(positions=pos, slot_mapping=slots, prefill=True, block_size=BS),
          torch.full((B,), S - 1, device=device))
    for step in range(3):                                        # positions 7, 8, 9
        p = torch.full((B, 1), S + step, device=device)
        batch = Batch(positions=p, prefill=False, block_tables=tables, block_size=BS,
                      slot_mapping=(tables.long().gather(1, p // BS) * BS + p % BS).reshape(-1),
                      kv_len=S + step + 1)
        tok = torch.full((B, 1), 3 + step, device=device)
        zero = torch.zeros(B, dtype=torch.long, device=device)
        monkeypatch.setattr(attention, "flash_decode", lambda q: False)
        want = model(tok, batch, zero)
        monkeypatch.setattr(attention, "flash_decode", lambda q: True)
        got = model(tok, batch, zero)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", ["torch", "torch+flash_decode", "triton"])
@torch.inference_mode()
def test_a_mixed_step_equals_its_prefill_and_decode_steps_apart(path, device, monkeypatch):
    """One mixed step (a prompt's second chunk, then two decode rows) gives the logits and
    KV of the chunk's prefill step and the rows' decode step run apart: on the torch path,
    with the decode rows through the Triton flash-decode kernel, and on the Triton path."""
    from lorry.engine.model import attention

    monkeypatch.setattr(attention, "flash_decode", lambda q: path != "torch")
    base = _model(device, torch.float32)
    tables = torch.tensor([[9, 3, 14], [5, 16, 1], [12, 7, 2]], dtype=torch.int32,
                          device=device)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (5, 3, 7)]

    def slot(r, p):
        return int(tables[r, p // BS]) * BS + p % BS

    # step 1 (both models alike): rows 0 and 1 whole, row 2's first 3 tokens
    lens = [5, 3, 3]
    S = max(lens)
    ids = torch.tensor([p[:n] + [0] * (S - n) for p, n in zip(prompts, lens)], device=device)
    pos = torch.minimum(torch.arange(S, device=device)[None, :],
                        torch.tensor(lens, device=device)[:, None] - 1)
    sm = torch.tensor([slot(r, j) if j < n else 0 for r, n in enumerate(lens) for j in range(S)],
                      device=device)
    first = base(ids, Batch(positions=pos, slot_mapping=sm, prefill=True, block_size=BS),
                 torch.tensor([n - 1 for n in lens], device=device))
    nxt = first.argmax(-1)[:2].tolist()                       # rows 0, 1 decode these next
    chunk = prompts[2][3:]                                    # row 2's last 4 tokens

    def chunk_batch():
        p = torch.arange(3, 7, device=device)[None, :]
        return _paged(Batch(positions=p, prefill=True, chunked=True, kv_len=7, block_size=BS,
                            slot_mapping=torch.tensor([slot(2, j) for j in range(3, 7)],
                                                      device=device)),
                      tables[2:3], [4], [3])

    def decode_batch():
        p = torch.tensor([[5], [3]], device=device)
        return Batch(positions=p, prefill=False, kv_len=6, block_size=BS, block_tables=tables[:2],
                     slot_mapping=torch.tensor([slot(0, 5), slot(1, 3)], device=device),
                     input_ids=torch.tensor(nxt, device=device))

    apart, mixed = copy.deepcopy(base), copy.deepcopy(base)
    last = torch.tensor([3], device=device)
    want = torch.cat([apart(torch.tensor([chunk], device=device), chunk_batch(), last),
                      apart(torch.tensor(nxt, device=device)[:, None], decode_batch(),
                            torch.zeros(2, dtype=torch.long, device=device))])
    batch = chunk_batch()
    batch.decode = decode_batch()
    ids = torch.tensor([chunk], device=device)
    if path == "triton":
        x = mixed.embed_tokens(torch.cat([ids.reshape(-1), batch.decode.input_ids]))
        got = mixed._forward_fused(x, batch, last, 1, 4)
    else:
        got = mixed(ids, batch, last)
    assert got.shape == (3, 128)
    _check(got, want, torch.float32)
    for a, b in zip(apart.layers, mixed.layers):                 # the same keys/values landed
        _check(b.self_attn.k_cache, a.self_attn.k_cache, torch.float32)
        _check(b.self_attn.v_cache, a.self_attn.v_cache, torch.float32)
