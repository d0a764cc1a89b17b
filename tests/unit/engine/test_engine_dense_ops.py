"""The vectorised CPU LoRA ops (backend "torch") equal the kernels' loop reference on adversarial mixes."""
from __future__ import annotations

import pytest
import torch

import lorry.kernels.torch_ref as ref
from lorry.kernels import dense_ops
from lorry.kernels.segments import build_lora_meta

MIXES = {
    "distinct": lambda T, L: torch.arange(T) % L,
    "uniform": lambda T, L: torch.full((T,), 1),
    "skewed": lambda T, L: torch.where(torch.arange(T) % 7 == 0, L - 1, 0),
    "none": lambda T, L: torch.full((T,), -1),
    "with_unadapted": lambda T, L: torch.randint(-1, L, (T,), generator=torch.Generator().manual_seed(T)),
}


@pytest.mark.parametrize("mix", sorted(MIXES))
@pytest.mark.parametrize("T", [1, 7, 133])
def test_add_lora_matches_reference(mix, T):
    g = torch.Generator().manual_seed(0)
    L, R, H, sizes = 4, 8, 32, [24, 8, 8]
    x = torch.randn(T, H, generator=g)
    a = [torch.randn(L, R, H, generator=g) for _ in sizes]
    b = [torch.randn(L, n, R, generator=g) for n in sizes]
    offsets = [0, 24, 32]
    meta = build_lora_meta(MIXES[mix](T, L), L)
    y0 = torch.randn(T, sum(sizes), generator=g)
    y_ref, y_dense = y0.clone(), y0.clone()
    ref.add_lora(y_ref, x, a, b, meta, offsets)
    dense_ops.add_lora(y_dense, x, a, b, meta, offsets)
    torch.testing.assert_close(y_dense, y_ref, atol=1e-5, rtol=1e-5)
    out = torch.zeros(len(sizes), T, R)
    dense_ops.lora_shrink(x, a, meta, out)
    y_two = y0.clone()
    dense_ops.lora_expand(out, b, meta, y_two, offsets)
    torch.testing.assert_close(y_two, y_ref, atol=1e-5, rtol=1e-5)


def test_packed_copy_is_dropped_when_a_slot_is_rewritten(tiny_llama):
    """max_loras=1: adapters take turns in one GPU slot; the CPU ops' packed copy of the slot
    must follow, so each adapter's tokens equal those of an engine that only ever held it."""
    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

    def engine():
        return LLMEngine(EngineConfig(model=str(tiny_llama.dir), device="cpu", max_loras=1,
                                      max_lora_rank=16, max_num_seqs=2, max_model_len=64))

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = [[5, 9, 33, 7, 81]]
    reqs = [LoRARequest(n, i + 1, str(tiny_llama.adapters[n]))
            for i, n in enumerate(["all_r4_rslora", "pattern", "all_r4_rslora"])]
    shared = engine()
    got = [shared.generate(prompt, params, [r], use_tqdm=False)[0].outputs[0].token_ids
           for r in reqs]
    want = [engine().generate(prompt, params, [r], use_tqdm=False)[0].outputs[0].token_ids
            for r in reqs]
    assert got == want and got[0] != got[1]


def test_invalidate_drops_the_packed_copy():
    g = torch.Generator().manual_seed(1)
    L, R, H, sizes = 2, 4, 16, [8, 8]
    x = torch.randn(5, H, generator=g)
    a = [torch.randn(L, R, H, generator=g) for _ in sizes]
    b = [torch.randn(L, n, R, generator=g) for n in sizes]
    meta = build_lora_meta(torch.tensor([0, 1, -1, 1, 0]), L)
    dense_ops.add_lora(torch.zeros(5, 16), x, a, b, meta, [0, 8])      # packs a and b
    for t in a + b:
        t.mul_(2.0)                                                     # slots rewritten
    dense_ops.invalidate(a)
    y_ref, y = torch.zeros(5, 16), torch.zeros(5, 16)
    ref.add_lora(y_ref, x, a, b, meta, [0, 8])
    dense_ops.add_lora(y, x, a, b, meta, [0, 8])
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["slots", "rows"])
def test_an_overflowing_adapter_leaves_other_tokens_alone(layout):
    """fp16: every token is multiplied with every slot's weights. Slot 0's products overflow
    (inf); the tokens of slot 1 and those without an adapter must not turn NaN through them,
    and must equal what they get with slot 0 empty."""
    from lorry.kernels.segments import SlotRows

    g = torch.Generator().manual_seed(3)
    L, R, H, sizes, T = 2, 8, 32, [16, 8], 6
    x = torch.randn(T, H, generator=g).half()
    a = [torch.randn(L, R, H, generator=g).half() for _ in sizes]
    b = [torch.randn(L, n, R, generator=g).half() for n in sizes]
    for t in a:
        t[0] = 6e4                        # x @ A0 is far past fp16's 65,504
    slots = torch.tensor([1, -1, 1, 0, 1, -1])
    rows_meta = None
    if layout == "rows":                  # slot 0 at rows 0-7, slot 1 at rows 16-23
        table = torch.tensor([[0, 16], [R, R]], dtype=torch.int32)
        rows_meta = SlotRows(table, R, row_align=16)
        a_rows, b_rows = [], []
        for ta, tb in zip(a, b):
            ra = torch.zeros(32, H, dtype=torch.half)
            rb = torch.zeros(tb.shape[1], 32, dtype=torch.half)
            ra[0:8], ra[16:24], rb[:, 0:8], rb[:, 16:24] = ta[0], ta[1], tb[0], tb[1]
            a_rows.append(ra)
            b_rows.append(rb)
        a, b = a_rows, b_rows
    meta = build_lora_meta(slots, L, rows_meta)
    offsets = [0, 16]
    y0 = torch.randn(T, sum(sizes), generator=g).half()
    emptied_a = [t.clone() for t in a]
    for t in emptied_a:
        if layout == "rows":
            t[0:8] = 0
        else:
            t[0] = 0
    others = slots != 0
    for fn in ("add_lora", "two_launch"):
        got, want = y0.clone(), y0.clone()
        for y, aa in ((got, a), (want, emptied_a)):
            if fn == "add_lora":
                dense_ops.add_lora(y, x, aa, b, meta, offsets)
            else:
                out = torch.zeros(len(sizes), T, R, dtype=torch.half)
                dense_ops.lora_shrink(x, aa, meta, out)
                dense_ops.lora_expand(out, b, meta, y, offsets)
        assert torch.isfinite(got[others]).all(), fn
        assert torch.equal(got[others], want[others]), fn
        assert torch.equal(got[slots == -1], y0[slots == -1]), fn
        assert not torch.equal(got[slots == 1], y0[slots == 1]), fn
