"""Tiny random base models and PEFT LoRA adapters, built on the fly for tests and benchmarks.

``lorry.testing`` is importable wherever ``lorry`` is (tests, ``benchmarks/``, ``scripts/``,
the GPU image); ``make_peft_adapter`` needs the ``peft`` package (the ``dev`` extra).

Nothing here downloads anything: the tokenizer is a byte-level BPE without merges built with
`tokenizers`, the weights are random, and adapters get random non-zero B so they matter.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_tiny_tokenizer(path: str | Path) -> int:
    """Write a byte-level tokenizer (256 bytes + bos/eos/pad) into ``path``; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {BOS: 0, EOS: 1, PAD: 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                            special_tokens=[(BOS, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(path))
    return len(vocab)


def make_tiny_llama(path: str | Path, *, hidden_size: int = 64, num_layers: int = 2,
                    num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int = 128,
                    vocab_size: int | None = None, tie_word_embeddings: bool = False,
                    seed: int = 0, model_type: str = "llama", rope_theta: float = 10000.0,
                    max_position_embeddings: int = 512) -> Path:
    """Write a random Llama-family HF directory (config, safetensors, tokenizer) to ``path``.

    ``model_type`` is one of "llama", "mistral", "qwen2" (qwen2 has q/k/v biases); other
    architectures: ``make_tiny_model`` with a transformers config.
    ``vocab_size`` defaults to the tokenizer's size (259).
    """
    from transformers import AutoConfig

    n_tok = make_tiny_tokenizer(Path(path))
    config = AutoConfig.for_model(
        model_type, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size, vocab_size=vocab_size or n_tok,
        tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings,
        rope_theta=rope_theta, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        sliding_window=None, use_sliding_window=False)
    return make_tiny_model(path, config, seed=seed)


def make_tiny_model(path: str | Path, config, *, seed: int = 0, norm_noise: float = 0.0) -> Path:
    """Write a random HF causal LM of any architecture from ``config`` (a transformers config
    object; its vocab_size should cover the tiny tokenizer's 259 tokens) with the tiny
    tokenizer to ``path``. ``norm_noise``: std of noise added to 1-D norm weights, so that
    norms that scale by (1 + weight) differ from plain ones."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_tiny_tokenizer(path)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 1, 2
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # wider init than HF's 0.02 so greedy tokens vary and adapters matter
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif "bias" in name:
                p.normal_(0.0, 0.05)
            elif "norm" in name and norm_noise:
                p.add_(torch.randn_like(p) * norm_noise)
    model.save_pretrained(str(path))
    return path


def make_peft_adapter(base_dir: str | Path, out_dir: str | Path, *, r: int = 8,
                      lora_alpha: float = 16, target_modules: Iterable[str] | str = ("q_proj", "v_proj"),
                      use_rslora: bool = False, rank_pattern: dict | None = None,
                      alpha_pattern: dict | None = None, seed: int = 0, init_scale: float = 0.1,
                      base_model=None, **extra) -> Path:
    """Create a PEFT LoRA adapter on ``base_dir`` with random (non-zero) A and B and save it.

    ``extra`` goes to ``peft.LoraConfig`` (e.g. ``fan_in_fan_out``, ``use_dora``, ``bias``).
    Pass ``base_model`` (a loaded HF model, left unchanged) to skip loading the base again.
    """
    import copy

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    if base_model is None:
        base_model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    else:
        base_model = copy.deepcopy(base_model)
    tm = target_modules if isinstance(target_modules, str) else list(target_modules)
    cfg = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=tm, use_rslora=use_rslora,
                     rank_pattern=rank_pattern or {}, alpha_pattern=alpha_pattern or {},
                     lora_dropout=0.0, task_type="CAUSAL_LM", **extra)
    peft_model = get_peft_model(base_model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                scale = init_scale if "lora_B" in name else 1.0 / p.shape[-1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    cfg_path = out / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(data, indent=2))
    return out


def write_random_adapter(out_dir: str | Path, base_config: dict, *, r: int = 8,
                         lora_alpha: float | None = None,
                         target_modules: Iterable[str] = ("q_proj", "v_proj"), seed: int = 0,
                         init_scale: float = 0.01, base_model_name_or_path: str | None = None) -> Path:
    """Write a PEFT-format LoRA adapter with random A/B straight from a base config.json dict.

    Much faster than ``make_peft_adapter`` for real-size bases (no model is instantiated);
    the files are what PEFT saves (``base_model.model.`` keys, adapter_config.json).
    """
    import torch
    from safetensors.torch import save_file

    from lorry.engine.lora.spec import ATTN, BaseShapes

    dims = BaseShapes.from_config(base_config).dims  # the base's module names and shapes
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(base_config["num_hidden_layers"]):
        for m in target_modules:
            fin, fout = dims[m]
            part = "self_attn" if m in ATTN else "mlp"
            pre = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(r, fin, generator=gen) / fin ** 0.5
            tensors[f"{pre}.lora_B.weight"] = torch.randn(fout, r, generator=gen) * init_scale
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": lora_alpha or 2 * r,
        "target_modules": list(target_modules), "bias": "none", "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0, "base_model_name_or_path": base_model_name_or_path}, indent=2))
    return out


def make_tiny_base_and_adapters(root: str | Path, adapters: dict, *, seed_offset: int = 0,
                                init_scale: float | None = None, **base_kwargs):
    """A tiny Llama under root/base plus one PEFT adapter per entry of ``adapters``
    (name -> (r, lora_alpha, target_modules, use_rslora)); returns (base_dir, {name: path})."""
    import torch
    from transformers import AutoModelForCausalLM

    root = Path(root)
    base = make_tiny_llama(root / "base", **base_kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    extra = {} if init_scale is None else {"init_scale": init_scale}
    paths = {name: make_peft_adapter(base, root / name, r=r, lora_alpha=a, target_modules=t,
                                     use_rslora=rs, seed=i + seed_offset, base_model=model,
                                     **extra)
             for i, (name, (r, a, t, rs)) in enumerate(adapters.items())}
    return base, paths
