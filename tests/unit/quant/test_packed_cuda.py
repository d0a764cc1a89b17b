"""GPTQ/AWQ checkpoints on a GPU: a mixed-adapter batch equals PEFT on the same base.

The engine runs on CUDA (packed int4 weights on the device, dequantized per step in fp32;
adapters in their GPU slots, LoRA through the backend that `lora_backend="auto"` picks
there); PEFT runs on the CPU over the same dequantized weights. Runs where CUDA exists
(the H200 of the device tool); skipped on CPU-only machines.
"""
from __future__ import annotations

import pytest
import torch

from lorry.engine.quant.rtn import export_rtn_checkpoint
from tests.unit.quant.helpers import assert_rows_match, engine_rows, peft_rows
from tests.unit.quant.test_packed import GROUP, dequantized_base_loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_mixed_batch_on_cuda_matches_peft_on_the_dequantized_base(tiny, method):
    from lorry.engine import EngineConfig, LLMEngine
    root, base, paths = tiny
    ckpt = export_rtn_checkpoint(base, root / f"{method}-cuda", method, group_size=GROUP)
    eng = LLMEngine(EngineConfig(model=str(ckpt), dtype="float32", device="cuda", max_loras=4,
                                 max_lora_rank=16))
    assert eng.info()["quantization"] == method
    report = eng.cache_stats()["base_weights"]
    assert report["base_weight_bytes"] < report["base_weight_bytes_unquantized"]
    tokens, logits = engine_rows(eng, paths)
    assert_rows_match((tokens, [lg.cpu() for lg in logits]),
                      peft_rows(dequantized_base_loader(base, method), paths))
