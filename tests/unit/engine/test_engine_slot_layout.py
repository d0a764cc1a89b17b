"""The LoRA row buffers: a swap writes exactly each module's (A, scaled B), padded with zeros,
in a few copies; a reused slot keeps nothing of its previous occupant."""
from __future__ import annotations

import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest
from lorry.engine.lora.resolve import resolve_dir
from lorry.engine.lora.spec import parse_adapter, read_base_config
from lorry.engine.lora.weights import load_adapter_weights


def _engine(base, max_loras):
    # the CPU path (also on GPU machines); the CUDA copy is checked in the *_cuda tests
    return LLMEngine(EngineConfig(model=str(base.dir), device="cpu", max_loras=max_loras,
                                  max_lora_rank=16, max_cpu_loras=8))


def _per_module(base, path):
    """The adapter as the old per-module loader reads it: (layer, module) -> (A, B*scale)."""
    cfg = read_base_config(base.dir)
    spec = parse_adapter(resolve_dir(str(path), what="adapter"), cfg, max_lora_rank=16)
    return load_adapter_weights(spec, cfg, 16, torch.float32, False).tensors


def _expected_slot(eng, tensors):
    """What the old method (zero every slice, copy A [r, in] and B [N, r]) leaves in a slot:
    {(layer, fused kind, slice index): (A [R, in], B [N, R])}."""
    out = {}
    for layer, kind, mod in eng.model.lora_layers():
        for s, name in enumerate(mod.slice_names):
            a = torch.zeros(16, mod.in_features)
            b = torch.zeros(mod.slice_sizes[s], 16)
            ab = tensors.get((layer, name))
            if ab is not None:
                r = ab[0].shape[0]
                a[:r], b[:, :r] = ab
            out[(layer, kind, s)] = (a, b)
    return out


def _slot_contents(eng, slot):
    """{(layer, kind, slice): (A, B)} of the slot's block in the row buffers (16 rows: the
    adapters here have ranks up to 16, one page)."""
    first, pages = eng.loras.gpu.block_of[slot]
    r0, n = first * eng.loras.gpu.page, pages * eng.loras.gpu.page
    assert n == 16
    return {(layer, kind, s): (mod.lora_a[s][r0:r0 + n], mod.lora_b[s][:, r0:r0 + n])
            for layer, kind, mod in eng.model.lora_layers() for s in range(len(mod.slice_names))}


def test_swap_writes_exactly_what_the_per_slice_method_wrote(tiny_llama):
    eng = _engine(tiny_llama, max_loras=4)
    for i, (name, path) in enumerate(tiny_llama.adapters.items()):
        req = LoRARequest(name, i + 1, str(path))
        eng.add_lora(req)
        slot = eng.loras.activate(req, set())
        want = _expected_slot(eng, _per_module(tiny_llama, path))
        got = _slot_contents(eng, slot)
        for key, (a, b) in want.items():
            torch.testing.assert_close(got[key][0], a, atol=0, rtol=0, msg=f"{name} A {key}")
            torch.testing.assert_close(got[key][1], b, atol=0, rtol=0, msg=f"{name} B {key}")
    # the layers' views share one buffer per fused kind: registering adds no memory
    bufs = eng.loras.gpu.buffers
    assert sorted(bufs) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    qkv = eng.model.layers[1].self_attn.qkv_proj
    assert qkv.lora_a[2].untyped_storage().data_ptr() == bufs["qkv_proj"][0].untyped_storage().data_ptr()


def test_one_copy_per_targeted_kind_and_matrix(tiny_llama):
    eng = _engine(tiny_llama, max_loras=4)
    qv = LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"]))
    every = LoRARequest("all", 2, str(tiny_llama.adapters["all_r4_rslora"]))
    for req in (qv, every):
        eng.add_lora(req)
    eng.loras.activate(qv, set())
    assert eng.loras.gpu.copies == 2          # q/v live in the qkv kind: its A and its B
    eng.loras.activate(every, set())
    assert eng.loras.gpu.copies == 2 + 8      # four kinds, A and B each


def test_reused_slot_keeps_nothing_of_the_previous_adapter(tiny_llama):
    eng = _engine(tiny_llama, max_loras=1)
    every = LoRARequest("all", 1, str(tiny_llama.adapters["all_r4_rslora"]))
    qv = LoRARequest("qv_r8", 2, str(tiny_llama.adapters["qv_r8"]))
    for req in (every, qv):
        eng.add_lora(req)
    slot = eng.loras.activate(every, set())
    assert any(slot in mod.active_slots for _, k, mod in eng.model.lora_layers() if k == "down_proj")
    assert eng.loras.activate(qv, set()) == slot   # evicts `every` from the only slot
    want = _expected_slot(eng, _per_module(tiny_llama, tiny_llama.adapters["qv_r8"]))
    got = _slot_contents(eng, slot)
    for key, (a, b) in want.items():
        assert torch.equal(got[key][0], a) and torch.equal(got[key][1], b), key
    for _, kind, mod in eng.model.lora_layers():
        assert (slot in mod.active_slots) == (kind == "qkv_proj"), kind
    stale = [k for k, (a, b) in got.items() if k[1] != "qkv_proj" and (a.any() or b.any())]
    assert not stale


def test_staging_buffer_is_the_cpu_copy(tiny_llama):
    eng = _engine(tiny_llama, max_loras=2)
    req = LoRARequest("pattern", 1, str(tiny_llama.adapters["pattern"]))
    eng.add_lora(req)
    w = eng.loras.cpu.peek(req)
    a, b = w.staged["qkv_proj"]
    layout = eng.loras.gpu.layout
    fam = layout.families["qkv_proj"]
    # one block: the adapter's largest rank rounded up to whole pages
    block = layout.block_rows(max(t[0].shape[0] for t in w.tensors.values()))
    assert a.shape == fam.a_shape(block) and b.shape == fam.b_shape(block)
    # the per-module tensors are views into the staging buffers, not second copies
    a0, _ = w.tensors[(0, "q_proj")]
    assert a0.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert w.nbytes == sum(t.numel() * t.element_size() for ab in w.staged.values() for t in ab)


def test_fold_puts_a_under_the_weight_only_where_it_adds_few_rows(tiny_llama):
    # EngineConfig.lora_fold: a kind is folded while its A rows (S * max_loras * R) add at most
    # FOLD_MAX_EXTRA of its base rows; the base weights stay bit for bit, as views of lora_ext
    from lorry.engine.lora.slot_layout import FOLD_MAX_EXTRA, FoldedA, SlotLayout
    for max_loras in (1, 8):
        eng = _engine(tiny_llama, max_loras=max_loras)
        before = {(layer, kind): mod.weight.clone() for layer, kind, mod in eng.model.lora_layers()}
        layout = SlotLayout(eng.model, 16)
        bufs = layout.allocate(max_loras * 16, torch.float32, torch.device("cpu"), fold=True)
        for kind, (a, _) in bufs.items():
            fam = layout.families[kind]
            cheap = len(fam.slice_names) * max_loras * 16 <= FOLD_MAX_EXTRA * sum(fam.slice_sizes)
            assert isinstance(a, FoldedA) == cheap, (max_loras, kind)
        assert any(isinstance(a, FoldedA) for a, _ in bufs.values()) == (max_loras == 1)
        for layer, kind, mod in eng.model.lora_layers():
            assert torch.equal(mod.weight, before[(layer, kind)])
            if isinstance(bufs[kind][0], FoldedA):
                assert mod.weight.data_ptr() == mod.lora_ext.data_ptr()
                assert mod.lora_a[0].data_ptr() == mod.lora_ext[mod.weight.shape[0]:].data_ptr()
