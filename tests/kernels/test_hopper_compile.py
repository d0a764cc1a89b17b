"""The paged attention and fp8 kernels compile for an H100/H200 (sm_90) on any machine.

The CPU interpreter runs a kernel's Python, not its compiled form: a kernel whose branches
give a variable two types, or that the compiler cannot lay out, passes every interpreted
test and fails at its first launch on a GPU. So each kernel is compiled here for sm_90 by
Triton's own compiler (no GPU needed), in a child process without TRITON_INTERPRET (which
replaces the kernels with interpreted functions), with the argument types of the engine's
calls: bf16 tensors, int32 block tables and rows, Llama-3-8B's heads and a Gemma-2-like
soft-capped, windowed 256-wide head; grouped heads packed per program; an fp8 cache under a
bf16 query (its dots in fp16).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

COMPILE = r"""
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module, name, consts, ptrs, floats = json.loads(sys.argv[1])
kernel = getattr(__import__(module, fromlist=[name]), name)
names = list(inspect.signature(kernel.fn).parameters)
sig = {n: "constexpr" if n in consts else ptrs.get(n) or ("fp32" if n in floats else "i32")
       for n in names}
src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v
                                                        for k, v in consts.items()})
out = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                     options={"num_warps": 4, "num_stages": 2})
print(json.dumps({"ptx": len(out.asm["ptx"]), "cubin": len(out.asm["cubin"])}))
"""

BF16, FP8 = "*bf16", "*fp8e4nv"
PREFILL_PTRS = {"q_ptr": BF16, "kc_ptr": BF16, "vc_ptr": BF16, "bt_ptr": "*i32",
                "rows_ptr": "*i32", "out_ptr": BF16}
DECODE_PTRS = {"q_ptr": BF16, "kc_ptr": BF16, "vc_ptr": BF16, "bt_ptr": "*i32",
               "pos_ptr": "*i64", "out_ptr": BF16, "part_ptr": "*fp32", "ml_ptr": "*fp32"}
FP8_CACHE = {"kc_ptr": FP8, "vc_ptr": FP8}
PREFILL = ("lorry.kernels.prefill_attention", "_prefill_attn_kernel")
DECODE = ("lorry.kernels.decode_attention", "_decode_attn_kernel")
LLAMA3_PREFILL = {"SOFTCAP": 0.0, "G": 4, "PACK": 4, "D": 128, "BLOCK_D": 128, "BLOCK_M": 64,
                  "BLOCK_N": 64, "BLOCK_SIZE": 16, "IEEE": False, "F16": False}
LLAMA3_DECODE = {"SOFTCAP": 0.0, "G": 4, "G_PAD": 16, "D": 128, "BLOCK_D": 128, "BLOCK_N": 64,
                 "BLOCK_SIZE": 16, "SPLITS": 4, "IEEE": False, "F16": False}
CASES = {
    "prefill_llama3": (*PREFILL, LLAMA3_PREFILL, PREFILL_PTRS),
    "prefill_one_head_a_program": (*PREFILL, dict(LLAMA3_PREFILL, PACK=1), PREFILL_PTRS),
    "prefill_softcap_d256": (*PREFILL, {
        "SOFTCAP": 50.0, "G": 2, "PACK": 2, "D": 256, "BLOCK_D": 256, "BLOCK_M": 64,
        "BLOCK_N": 64, "BLOCK_SIZE": 16, "IEEE": False, "F16": False}, PREFILL_PTRS),
    "prefill_fp8_cache": (*PREFILL, dict(LLAMA3_PREFILL, F16=True),
                          dict(PREFILL_PTRS, **FP8_CACHE)),
    "decode_llama3_splits": (*DECODE, LLAMA3_DECODE, DECODE_PTRS),
    "decode_fp8_cache": (*DECODE, dict(LLAMA3_DECODE, F16=True), dict(DECODE_PTRS, **FP8_CACHE)),
    "decode_merge_splits": ("lorry.kernels.decode_attention", "_merge_splits_kernel", {
        "D": 128, "BLOCK_D": 128, "SPLITS": 4},
        {"part_ptr": "*fp32", "ml_ptr": "*fp32", "pos_ptr": "*i64", "out_ptr": BF16}),
    # EngineConfig.quantization="fp8" and kv_cache_dtype="fp8": the norm and silu*up that
    # quantize the next linear's rows, the W8A8 GEMM, the rotary write into an fp8 cache
    "add_rmsnorm_fp8_rows": ("lorry.kernels.fused_ops", "_add_rmsnorm_kernel", {
        "HAS_RES": True, "QUANT": True, "BLOCK": 4096},
        {"x_ptr": BF16, "res_ptr": BF16, "w_ptr": BF16, "out_ptr": BF16, "q_ptr": FP8,
         "s_ptr": "*fp32"}),
    "silu_mul_fp8_rows": ("lorry.kernels.fused_ops", "_silu_mul_fp8_kernel", {"BLOCK": 4096},
                          {"gu_ptr": BF16, "out_ptr": BF16, "q_ptr": FP8, "s_ptr": "*fp32"}),
    "fp8_matmul": ("lorry.kernels.fp8_matmul", "_fp8_matmul_kernel", {
        "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "EVEN_K": True},
        {"x_ptr": FP8, "w_ptr": FP8, "sx_ptr": "*fp32", "sw_ptr": "*fp32", "out_ptr": BF16}),
    "rotary_write_fp8_cache": ("lorry.kernels.fused_ops", "_rotary_qk_kernel", {
        "HEADS": 32, "KV_HEADS": 8, "HALF": 64, "BLOCK_H": 64, "BLOCK_HALF": 64,
        "WRITE_CACHE": True},
        {"qkv_ptr": BF16, "pos_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
         "slot_ptr": "*i64", "kc_ptr": FP8, "vc_ptr": FP8}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_kernel_compiles_for_sm90(case):
    module, name, consts, ptrs = CASES[case]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    arg = json.dumps([module, name, consts, ptrs, ["scale", "q_shift", "eps"]])
    done = subprocess.run([sys.executable, "-c", COMPILE, arg], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    assert sizes["ptx"] > 0 and sizes["cubin"] > 0
