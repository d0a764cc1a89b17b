"""End-to-end generation throughput: HF base only, PEFT mixed-adapter batch, Lorry mixed.

CPU (default): SmolLM2-135M fp32, 16 requests over 4 adapters (r8, all linear layers),
32-token prompts, 32 new tokens -- all three in one run, printed as JSON.
GPU (``--device cuda --preset llama3-8b``): Llama-3-8B shapes with random (dummy) weights,
32 adapters r16 on q/k/v/o, 128 requests 128 -> 128 tokens, batch 64 (Lorry only by default).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# the script's folder holds benchmarks/queue.py, which would shadow the stdlib `queue`
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

PRESETS = {
    "smollm2": {"requests": 16, "adapters": 4, "rank": 8, "targets": "all-linear", "prompt_len": 32,
                    "new_tokens": 32, "batch": 16},
    "llama3-8b": {"requests": 128, "adapters": 32, "rank": 16, "targets": ["q_proj", "k_proj", "v_proj",
                      "o_proj"], "prompt_len": 128, "new_tokens": 128, "batch": 64},
}
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
             "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16"}


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(vocab, 30000), (n, length), generator=gen).tolist()


def bench_lorry(model: str, adapters: list[Path], prompts, p: dict, device: str,
                load_format: str) -> dict:
    from engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams

    eng = LLMEngine(EngineConfig(model=model, device=device, max_loras=len(adapters),
                                 max_lora_rank=max(p["rank"], 8), max_num_seqs=p["batch"],
                                 max_model_len=p["prompt_len"] + p["new_tokens"] + 8,
                                 load_format=load_format))
    reqs = [LoRARequest(f"a{i}", i + 1, str(a)) for i, a in enumerate(adapters)]
    sp = SamplingParams(max_tokens=p["new_tokens"], temperature=0.0, ignore_eos=True)
    loras = [reqs[i % len(reqs)] for i in range(len(prompts))]
    eng.generate(prompts[:2], sp, loras[:2], use_tqdm=False)  # warm-up (adapters loaded)
    _sync(device)
    t0 = time.perf_counter()
    outs = eng.generate(prompts, sp, loras, use_tqdm=False)
    _sync(device)
    dt = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": n, "seconds": round(dt, 3), "tok_per_s": round(n / dt, 1),
            "lora_backend": eng.info()["lora_backend"], "cache": eng.cache_stats()["gpu"]}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def bench_hf(model_dir: str, adapters: list[Path], prompts, p: dict, device: str) -> dict:
    """HF base-only generate and PEFT's mixed-adapter batch (``adapter_names=``)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    kw = {"max_new_tokens": p["new_tokens"], "min_new_tokens": p["new_tokens"], "do_sample": False,
              "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    res = {}

    def timed(name, model, **extra):
        with torch.no_grad():
            model.generate(ids[:2], **{**kw, "attention_mask": kw["attention_mask"][:2]},
                           **{k: v[:2] for k, v in extra.items()})
            _sync(device)
            t0 = time.perf_counter()
            out = model.generate(ids, **kw, **extra)
            _sync(device)
        dt = time.perf_counter() - t0
        n = (out.shape[1] - ids.shape[1]) * ids.shape[0]
        res[name] = {"tokens": n, "seconds": round(dt, 3), "tok_per_s": round(n / dt, 1)}

    timed("hf_base", base)
    peft = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        peft.load_adapter(str(a), adapter_name=f"a{i}")
    names = [f"a{i % len(adapters)}" for i in range(len(prompts))]
    timed("peft_mixed", peft, adapter_names=names)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", default=None, choices=sorted(PRESETS))
    ap.add_argument("--model", default=None, help="base model dir (CPU default: the demo model)")
    ap.add_argument("--baselines", action="store_true", help="also run HF/PEFT on GPU presets")
    args = ap.parse_args()
    preset = args.preset or ("smollm2" if args.device == "cpu" else "llama3-8b")
    p = PRESETS[preset]
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="lorry-bench-"))
    if preset == "llama3-8b":
        from tests.tiny_models import make_tiny_tokenizer

        model = tmp / "llama3-8b-dummy"
        model.mkdir()
        (model / "config.json").write_text(json.dumps(LLAMA3_8B))
        make_tiny_tokenizer(model)
        config, load_format = LLAMA3_8B, "dummy"
    else:
        from engine.demo_model import prepare_demo_model

        model = Path(args.model) if args.model else prepare_demo_model()
        config, load_format = json.loads((model / "config.json").read_text()), "auto"
    from tests.tiny_models import write_random_adapter

    adapters = [write_random_adapter(tmp / f"a{i}", config, r=p["rank"], seed=i,
                                     target_modules=_targets(p["targets"]))
                for i in range(p["adapters"])]
    prompts = prompts_for(p["requests"], p["prompt_len"], config["vocab_size"], seed=0)
    result = {"preset": preset, "device": args.device, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "workload": p}
    result["lorry_mixed"] = bench_lorry(str(model), adapters, prompts, p, args.device, load_format)
    if args.device == "cpu" or args.baselines:
        result.update(bench_hf(str(model), adapters, prompts, p, args.device))
        result["lorry_vs_peft_mixed"] = round(result["lorry_mixed"]["tok_per_s"]
                                              / result["peft_mixed"]["tok_per_s"], 2)
        result["lorry_vs_hf_base"] = round(result["lorry_mixed"]["tok_per_s"]
                                           / result["hf_base"]["tok_per_s"], 2)
    print(json.dumps(result, indent=2))


def _targets(t) -> list[str]:
    return ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] \
        if t == "all-linear" else list(t)


if __name__ == "__main__":
    main()
