"""GPTQ/AWQ checkpoints: on-disk format facts, exact dequantization, and PEFT parity."""
from __future__ import annotations

import pytest
import torch

from lorry.engine.quant import packed_format as pf
from lorry.engine.quant.rtn import QUANTIZED_MODULES, export_rtn_checkpoint, rtn_quantize
from tests.unit.quant.helpers import assert_rows_match, engine_rows, peft_rows

GROUP = 32


def test_gptq_packs_input_rows_lsb_first_and_stores_zero_minus_one():
    q = torch.arange(8, dtype=torch.int32)[:, None].repeat(1, 8)     # input row i has value i
    qweight, qzeros = pf.pack_gptq(q, torch.full((1, 8), 8, dtype=torch.int32))
    assert qweight.shape == (1, 8) and qweight[0, 0].item() == 0x76543210
    assert qzeros.shape == (1, 1) and qzeros[0, 0].item() == 0x77777777  # sym zero 8, v1 -> 7


def test_awq_packs_output_columns_in_interleaved_order():
    q = torch.arange(8, dtype=torch.int32)[None, :]                   # column j has value j
    qweight, qzeros = pf.pack_awq(q, q.clone())
    assert qweight.shape == (1, 1) and qweight[0, 0].item() == 0x75316420
    assert qzeros[0, 0].item() == 0x75316420                           # zeros: same order, as is


@pytest.mark.parametrize("pack,unpack", [(pf.pack_gptq, pf.unpack_gptq),
                                         (pf.pack_awq, pf.unpack_awq)])
def test_unpack_inverts_pack(pack, unpack):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (64, 24), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (2, 24), generator=g, dtype=torch.int32)
    q2, z2 = unpack(*pack(q, zeros))
    assert torch.equal(q2, q) and torch.equal(z2, zeros)


def test_act_order_g_idx_is_honoured():
    from lorry.engine.quant.packed_linear import PackedInt4Linear
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (64, 16), generator=g, dtype=torch.int32)          # [in, out]
    zeros = torch.randint(0, 16, (4, 16), generator=g, dtype=torch.int32)
    scales = torch.rand(4, 16, generator=g).half() + 0.01
    g_idx = pf.group_index(64, 16)[torch.randperm(64, generator=g)]             # desc_act
    op = PackedInt4Linear(q.t(), zeros.t(), scales.t(), g_idx, None, torch.float32)
    assert op.act_order
    assert torch.equal(op.dequantize(), pf.dequantize(q, zeros, scales, g_idx))


@pytest.fixture(scope="module", params=["gptq", "awq"])
def packed(request, tiny):
    from lorry.engine import EngineConfig, LLMEngine
    root, base, paths = tiny
    ckpt = export_rtn_checkpoint(base, root / request.param, request.param, group_size=GROUP)
    eng = LLMEngine(EngineConfig(model=str(ckpt), dtype="float32", device="cpu", max_loras=4,
                                 max_lora_rank=16))
    return request.param, base, paths, eng


def _reference_weights(base, method):
    """Dense W of every quantized linear, dequantized from the quantizer's own integers."""
    from safetensors.torch import load_file
    ref = {}
    for name, w in load_file(str(base / "model.safetensors")).items():
        if name.endswith(".weight") and name.split(".")[-2] in QUANTIZED_MODULES:
            q, zeros, scales = rtn_quantize(w, GROUP, sym=method == "gptq")
            ref[name] = pf.dequantize(q, zeros, scales, pf.group_index(w.shape[1], GROUP))
    return ref


def test_loaded_weights_equal_the_quantizer_reference(packed):
    from lorry.engine.model.llama import PACKED_MODULES
    method, base, _, eng = packed
    assert eng.info()["quantization"] == method          # detected from config.json
    ref = _reference_weights(base, method)
    for i, fused, mod in eng.model.lora_layers():
        part = "self_attn" if fused in ("qkv_proj", "o_proj") else "mlp"
        want = torch.cat([ref[f"model.layers.{i}.{part}.{m}.weight"]
                          for m in PACKED_MODULES[fused]])
        assert torch.equal(mod.base_op.dequantize(), want)
    report = eng.cache_stats()["base_weights"]
    assert report["base_weight_bytes"] < report["base_weight_bytes_unquantized"]


def dequantized_base_loader(base, method):
    """A loader of the HF base whose quantized linears hold the dequantized weights (the
    reference PEFT runs on)."""
    from transformers import AutoModelForCausalLM
    ref = _reference_weights(base, method)

    def load_base():
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        state = model.state_dict()
        with torch.no_grad():
            for name, w in ref.items():
                state[name].copy_(w)
        return model
    return load_base


def test_mixed_batch_matches_peft_on_the_dequantized_base(packed):
    method, base, paths, eng = packed
    assert_rows_match(engine_rows(eng, paths),
                      peft_rows(dequantized_base_loader(base, method), paths))
