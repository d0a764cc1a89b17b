"""quantization="fp8": W8A8 float8 e4m3 base weights (per output channel) and activations (per
token) under full-precision LoRA, against PEFT on a base that rounds the same way."""
from __future__ import annotations

import pytest
import torch

from lorry.engine.quant.onthefly import FP8, Fp8Linear, check_device
from tests.unit.quant.helpers import assert_rows_match, engine_rows, peft_rows

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _round_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x rounded as e4m3 with one absmax / 448 scale per slice along ``dim``, back in fp32."""
    s = x.float().abs().amax(dim, keepdim=True).clamp(min=1e-12) / 448.0
    return (x.float() / s).to(FP8).float() * s


def _fp8_base(model):
    """HF's base linears compute on e4m3-rounded weights (per output row) and inputs (per
    token); PEFT's LoRA branches still see the full-precision inputs."""
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in LINEARS:
            with torch.no_grad():
                mod.weight.copy_(_round_rows(mod.weight, 1))
            mod.register_forward_pre_hook(lambda m, args: (_round_rows(args[0], -1),))
    return model


def _engine(base, method):
    from lorry.engine import EngineConfig, LLMEngine
    return LLMEngine(EngineConfig(model=str(base), dtype="float32", device="cpu", max_loras=4,
                                  max_lora_rank=16, quantization=method))


def test_mixed_batch_matches_peft_on_an_fp8_rounded_base(tiny):
    from transformers import AutoModelForCausalLM
    _, base, paths = tiny
    eng = _engine(base, "fp8")
    assert eng.cache_stats()["base_weights"]["base_kernels"] == ["fp8-scaled-mm"]
    got = engine_rows(eng, paths)
    want = peft_rows(lambda: _fp8_base(AutoModelForCausalLM.from_pretrained(
        str(base), dtype=torch.float32, device_map="cpu")), paths)
    assert_rows_match(got, want)
    # ... and the rounding is real: the full-precision base's logits differ by its amount
    full = engine_rows(_engine(base, None), paths)[1]
    rel = [((a - b).norm() / a.norm()).item() for a, b in zip(full, got[1])]
    assert all(0.001 < r < 0.3 for r in rel), rel


def test_fp8_base_holds_a_quarter_of_fp32_and_frees_the_dense_copy(tiny):
    _, base, _ = tiny
    eng = _engine(base, "fp8")
    dense = sum(m.in_features * sum(m.slice_sizes) * 4 for _, _, m in eng.model.lora_layers())
    quant = sum(m.base_op.resident_bytes() for _, _, m in eng.model.lora_layers())
    assert quant <= 0.3 * dense                              # 1 byte a weight + row scales
    assert all(m.weight is None for _, _, m in eng.model.lora_layers())
    assert eng.info()["quantization"] == "fp8"


def test_fp8_refuses_shapes_and_devices_it_cannot_run(monkeypatch, tmp_path):
    from lorry.engine.model import loader
    from lorry.testing import make_tiny_llama

    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear(torch.randn(24, 64), None)
    # a base of hidden size 40: refused from its config, before any weight is read
    odd = make_tiny_llama(tmp_path / "odd", hidden_size=40, num_heads=4, num_kv_heads=2,
                          intermediate_size=72)
    reads = []
    monkeypatch.setattr(loader, "_weight_files", lambda d: reads.append(d) or [])
    with pytest.raises(ValueError, match=r"multiples of 16.*'hidden_size': 40"):
        _engine(odd, "fp8")
    assert reads == []
    check_device("fp8", torch.device("cpu"), torch.float32)          # the CPU runs it
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="compute capability 8.9 or newer.*is 8.0"):
        check_device("fp8", torch.device("cuda"), torch.bfloat16)


def test_an_fp8_linear_is_the_product_of_its_rounded_operands():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g) * 0.02, torch.randn(48, generator=g)
    x = torch.randn(7, 32, generator=g) * 3
    x[2] = 0.0                                                 # a zero row: no NaN from its scale
    m = Fp8Linear(w, b)
    y = m(x)
    want = _round_rows(x, -1) @ _round_rows(w, 1).t() + b
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(y, x @ w.t() + b)
    assert m(x[:0]).shape == (0, 48)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_an_fp8_linear_on_cuda_is_its_rounded_product_also_replayed_in_a_graph():
    # the Triton row quantizer, row-wise scaled _scaled_mm with a bf16 output, graph capture
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(512, 256, generator=g) * 0.02, torch.randn(512, generator=g)
    x = (torch.randn(40, 256, generator=g) * 3).bfloat16()
    m = Fp8Linear(w.cuda(), b.bfloat16().cuda())
    xc = x.cuda()
    y = m(xc)
    want = _round_rows(x.float(), -1) @ _round_rows(w, 1).t() + b.bfloat16().float()
    torch.testing.assert_close(y.float().cpu(), want, rtol=2e-2, atol=2e-2)
    assert y.dtype == torch.bfloat16
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        yg = m(xc)
    xc.copy_((x * 2).cuda())
    graph.replay()
    assert torch.equal(yg, m(xc))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_norms_quantize_the_fp8_linears_inputs_changing_no_logit(tiny, monkeypatch):
    # the fused norm and silu*up kernels hand qkv_proj, gate_up_proj and down_proj their
    # inputs quantized (fp8=True); the same engine quantizing in each linear gives the same
    # (at this model's widths; a wider norm row may be summed in another order by the two
    # compiled kernels: tests/kernels/test_fused_ops.py compares those within rounding)
    from lorry.engine import EngineConfig, LLMEngine
    from lorry.engine.model.layers import LoRALinear
    from lorry.kernels import fused_ops

    _, base, paths = tiny
    calls = []
    real = fused_ops.quant_fp8_rows
    monkeypatch.setattr(fused_ops, "quant_fp8_rows", lambda x: calls.append(1) or real(x))

    def run():
        calls.clear()
        eng = LLMEngine(EngineConfig(model=str(base), dtype="bfloat16", device="cuda",
                                     max_loras=4, max_lora_rank=16, quantization="fp8"))
        rows = engine_rows(eng, paths)
        return rows, len(calls)

    (tokens, logits), fused_calls = run()
    monkeypatch.setattr(LoRALinear, "fp8_rows", lambda self: False)
    (want_tokens, want_logits), calls_unfused = run()
    assert tokens == want_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, want_logits))
    assert 0 < fused_calls < calls_unfused                 # o_proj alone quantizes apart


def test_the_gemm_switch_picks_triton_by_rows_only_when_asked(monkeypatch):
    # Fp8Linear.GEMM: "scaled_mm" (default) never, "triton" always, "auto" up to 64 rows
    assert not any(Fp8Linear.triton_rows(r) for r in (1, 64, 4096))
    monkeypatch.setattr(Fp8Linear, "GEMM", "auto")
    assert [Fp8Linear.triton_rows(r) for r in (1, 64, 65, 256)] == [True, True, False, False]
    assert Fp8Linear.gemm_for(torch.zeros(8, 16)) is None          # CPU: plain fp32 math
    monkeypatch.setattr(Fp8Linear, "GEMM", "triton")
    assert Fp8Linear.triton_rows(4096)
