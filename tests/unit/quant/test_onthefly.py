"""bitsandbytes and torchao bases with a mixed-adapter batch match PEFT on the same quantized base."""
from __future__ import annotations

import pytest
import torch

from tests.unit.quant.helpers import assert_rows_match, engine_rows, peft_rows


def _hf_quant_config(method: str):
    from transformers import BitsAndBytesConfig, TorchAoConfig
    if method.startswith("bnb-") and method != "bnb-int8":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=method[4:],
                                  bnb_4bit_compute_dtype=torch.float32)
    if method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int8WeightOnlyConfig
    return TorchAoConfig(Int8WeightOnlyConfig())


def _plain_bnb_matmul(model):
    """HF's Linear4bit on a CPU with AVX512-BF16 repacks its weights for a fused kernel that
    computes in bf16 whatever the compute dtype (bitsandbytes >= 0.50): turned off, so that
    PEFT runs the dequantized fp32 product on the same 4-bit weights, as the engine does."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def _engine(base, method):
    from lorry.engine import EngineConfig, LLMEngine
    return LLMEngine(EngineConfig(model=str(base), dtype="float32", device="cpu", max_loras=4,
                                  max_lora_rank=16, quantization=method))


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8", "torchao-int8"])
def test_mixed_batch_matches_peft_on_the_same_quantized_base(tiny, method):
    from transformers import AutoModelForCausalLM
    _, base, paths = tiny
    eng = _engine(base, method)
    # LLM.int8 picks outlier input columns (|x| > 6) over the whole batch, as in HF, so its
    # rows are compared one at a time like PEFT runs them; the other bases mix all rows
    got = engine_rows(eng, paths, one_by_one=method == "bnb-int8")
    want = peft_rows(lambda: _plain_bnb_matmul(AutoModelForCausalLM.from_pretrained(
        str(base), dtype=torch.float32, device_map="cpu",
        quantization_config=_hf_quant_config(method))), paths)
    assert_rows_match(got, want)


def test_quantized_base_differs_from_the_full_precision_base(tiny):
    # the parity above is only meaningful if quantizing changes the model's outputs
    _, base, paths = tiny
    full = engine_rows(_engine(base, None), paths)[1]
    nf4 = engine_rows(_engine(base, "bnb-nf4"), paths)[1]
    # ... by a quantization's amount: every row moves, none as far as unrelated logits do
    # (0.10-0.46 relative on this tiny random model; unrelated logits of equal norm: ~1.4)
    rel = [((a - b).norm() / a.norm()).item() for a, b in zip(full, nf4)]
    assert all(0.01 < r < 0.8 for r in rel), rel


@pytest.mark.parametrize("method,max_ratio", [("bnb-nf4", 0.2), ("bnb-int8", 0.3),
                                              ("torchao-int8", 0.3)])
def test_memory_report_counts_quantized_base_bytes(tiny, method, max_ratio):
    _, base, _ = tiny
    eng = _engine(base, method)
    report = eng.cache_stats()["base_weights"]
    info = eng.info()
    assert info["quantization"] == method
    assert info["base_weight_bytes"] == report["base_weight_bytes"]
    model = eng.model
    dense_linear = sum(m.in_features * sum(m.slice_sizes) * 4 for _, _, m in model.lora_layers())
    quant_linear = sum(m.base_op.resident_bytes() for _, _, m in model.lora_layers())
    assert quant_linear <= max_ratio * dense_linear          # fp32 -> 4 or 8 bits + scales
    saved = report["base_weight_bytes_unquantized"] - report["base_weight_bytes"]
    assert saved == dense_linear - quant_linear
    assert all(m.weight is None for _, _, m in model.lora_layers())   # dense copy freed

