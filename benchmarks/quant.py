"""Quantized bases under LoRA: decode tokens/s and base weight bytes against the bf16 base.

Llama-3.2-1B-like shapes with random (dummy) weights; GPTQ/AWQ bases are round-to-nearest
4-bit quantizations of those weights (engine.quant.rtn), bnb/torchao run where installed.
Every variant serves the same mixed-adapter batch (adapters r16 on q/k/v/o + rows without).
Prints JSON. ``python benchmarks/quant.py --device cuda``.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

LLAMA_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
            "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
            "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16"}
TINY = {**LLAMA_1B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}


def run(model: str, method, adapters, prompts, args, eager: bool) -> dict:
    import torch

    from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
    eng = LLMEngine(EngineConfig(
        model=model, device=args.device, load_format="dummy", quantization=method,
        max_loras=len(adapters), max_cpu_loras=len(adapters), max_lora_rank=16,
        max_num_seqs=args.batch, max_model_len=args.prompt_len + args.new_tokens + 8,
        enforce_eager=eager))
    reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapters)]
    # every fourth row has no adapter; the rest cycle over the adapters
    loras = [None if i % 4 == 3 else reqs[i % len(reqs)] for i in range(len(prompts))]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    eng.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                 loras, use_tqdm=False)                                   # warm-up
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    outs = eng.generate(prompts, params, loras, use_tqdm=False)
    sync()
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    rep = eng.cache_stats()["base_weights"]
    res = {"tok_per_s": round(n / dt, 1), "seconds": round(dt, 3), "tokens": n,
           "base_weight_bytes": rep["base_weight_bytes"],
           "base_weight_bytes_unquantized": rep["base_weight_bytes_unquantized"],
           "base_kernels": rep["base_kernels"],
           "cuda_graphs": not eager and args.device == "cuda",
           "first_tokens": outs[0].outputs[0].token_ids[:8]}
    if args.device == "cuda":
        res["gpu_allocated_bytes"] = torch.cuda.memory_allocated()
    del eng
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--methods", nargs="*", default=None,
                    help="default: none (bf16), gptq, awq, and bnb/torchao where installed")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--int4-kernel", default="auto", choices=["auto", "dequant"],
                    help="GPTQ/AWQ on CUDA: tinygemm where it applies, or dequantize + matmul")
    args = ap.parse_args()
    if args.int4_kernel == "dequant":
        from lorry.engine.quant import packed_linear
        packed_linear.USE_TINYGEMM = False
    import torch

    from lorry.testing import make_tiny_tokenizer, write_random_adapter
    config = LLAMA_1B if args.device == "cuda" else TINY
    methods = args.methods
    if methods is None:
        methods = ["none", "gptq", "awq"]
        if importlib.util.find_spec("bitsandbytes"):
            methods += ["bnb-nf4", "bnb-int8"]
        if importlib.util.find_spec("torchao"):
            methods += ["torchao-int8"] + (["torchao-int4"] if args.device == "cuda" else [])
    tmp = Path(tempfile.mkdtemp(prefix="lorry-quant-"))
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    make_tiny_tokenizer(model)
    adapters = [write_random_adapter(tmp / f"a{i}", config, r=16, seed=i,
                                     target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
                for i in range(args.adapters)]
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(10, min(config["vocab_size"], 30000),
                            (args.requests, args.prompt_len), generator=gen).tolist()
    result = {"device": args.device, "torch": torch.__version__, "config": {
        k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                               "vocab_size")}, "workload": vars(args),
        "packages": {p: importlib.util.find_spec(p) is not None
                     for p in ("bitsandbytes", "torchao", "gptqmodel", "awq")}}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    for m in methods:
        method = None if m == "none" else m
        try:
            result[m] = run(str(model), method, adapters, prompts, args, eager=False)
        except Exception as e:  # noqa: BLE001 -- report, then try without CUDA graphs
            result[m] = {"error": f"{type(e).__name__}: {e}"[:300]}
            if args.device == "cuda":
                try:
                    result[m] = run(str(model), method, adapters, prompts, args, eager=True)
                    result[m]["graph_error"] = f"{type(e).__name__}: {e}"[:200]
                except Exception as e2:  # noqa: BLE001
                    result[m]["eager_error"] = f"{type(e2).__name__}: {e2}"[:300]
        print(json.dumps({m: result[m]}), file=sys.stderr, flush=True)
    base = result.get("none", {}).get("tok_per_s")
    for m in methods:
        r = result[m]
        if base and "tok_per_s" in r:
            r["speed_vs_bf16"] = round(r["tok_per_s"] / base, 3)
            r["base_bytes_ratio"] = round(r["base_weight_bytes"] / r[
                "base_weight_bytes_unquantized"], 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
