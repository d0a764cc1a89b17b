"""Assemble an engine's parts from its config: device, model, tokenizer, caches, runner."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorry.engine.config import EngineConfig
from lorry.engine.kv_cache import BlockManager
from lorry.engine.lora.manager import LoRAManager
from lorry.engine.lora.resolve import MODEL_FILES, resolve_dir
from lorry.engine.lora.spec import read_base_config
from lorry.engine.model.arch import check_supported
from lorry.engine.model.loader import load_hf_config, load_model
from lorry.engine.quant.onthefly import fp8_shortfall
from lorry.engine.runner import ModelRunner
from lorry.engine.scheduler import Scheduler
from lorry.engine.tokenizer import Tokenizer
from lorry.kernels.backends import get_lora_ops

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KV_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def kv_cache_dtype(name: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype for EngineConfig.kv_cache_dtype ``name`` ("auto": the model's);
    ValueError where the device's kernels cannot convert to it."""
    kv = KV_DTYPES.get(name, dtype)
    if kv != dtype and (cap := fp8_shortfall(device)):
        raise ValueError(f"EngineConfig.kv_cache_dtype={name!r} needs a GPU of compute "
                         f"capability 8.9 or newer (Ada, Hopper) for fp8 conversions; this one "
                         f"is {cap}: use kv_cache_dtype='auto'")
    return kv


@dataclass
class EngineParts:
    device: torch.device
    dtype: torch.dtype
    model_dir: Path
    hf_config: object
    model: object
    tokenizer: Tokenizer
    max_model_len: int
    lora_backend: str
    loras: LoRAManager | None
    runner: ModelRunner
    scheduler: Scheduler


# prefill_min_tokens where EngineConfig leaves it None, on CUDA: a mixed step's host floor
# (~60-77 ms on an H100) is what 2,000-4,000 prompt tokens cost the GPU; 4096 gave 1.057x on
# the bulk workload (schedule_replay.py --hold models 2048-8192 within 1.5% of each other)
CUDA_PREFILL_MIN_TOKENS = 4096


def prefill_min_tokens(c: EngineConfig, device: torch.device) -> int:
    """The scheduler's prompt hold: the config's, or by device where it says None."""
    if c.prefill_min_tokens is not None:
        return c.prefill_min_tokens
    return CUDA_PREFILL_MIN_TOKENS if device.type == "cuda" else 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("EngineConfig.device='cuda' but no CUDA device is available; "
                         "allowed here: 'cpu' or 'auto'")
    return torch.device(name)


def _graph_bytes(c: EngineConfig, model) -> int:
    """What captured decode graphs keep alive: fp32 logits [size, vocab] per bucket, with and
    without LoRA (their activations are temporaries of one shared pool)."""
    if c.enforce_eager:
        return 0
    from lorry.engine.graphs import size_ladder

    vocab = model.lm_weight().shape[0]
    return 2 * sum(size_ladder(c.max_num_seqs)) * vocab * 4


def kv_blocks(c: EngineConfig, model, max_len: int, device: torch.device,
              kv_dtype: torch.dtype | None = None) -> int:
    """The KV pool's size in blocks (the null block included): ``num_kv_blocks`` if set;
    on CUDA what ``gpu_memory_utilization`` leaves after everything allocated so far and the
    decode graphs' outputs (at most twice what ``max_num_seqs`` full-length sequences need:
    the rest would only hold older prefixes); else room for ``max_num_seqs`` sequences of
    ``max_model_len``."""
    per_seq = -(-max_len // c.block_size)
    if c.num_kv_blocks is not None:
        n = c.num_kv_blocks
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = c.gpu_memory_utilization * total - (total - free) - _graph_bytes(c, model)
        n = min(int(budget // model.kv_block_bytes(c.block_size, kv_dtype)),
                2 * c.max_num_seqs * per_seq + 1)
    else:
        n = c.max_num_seqs * per_seq + 1
    if n - 1 < per_seq:
        raise ValueError(f"the KV cache holds {max(n - 1, 0)} blocks of {c.block_size} tokens, "
                         f"fewer than one sequence of max_model_len={max_len} needs ({per_seq}): "
                         "raise num_kv_blocks or gpu_memory_utilization, or lower max_model_len")
    return n


def build_engine_parts(c: EngineConfig) -> EngineParts:
    device = _device(c.device)
    dtype = DTYPES.get(c.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    lora_dtype = DTYPES.get(c.lora_dtype, dtype)
    kv_dtype = kv_cache_dtype(c.kv_cache_dtype, dtype, device)  # before any weight is read
    backend = c.lora_backend if c.lora_backend != "auto" else (
        "triton" if device.type == "cuda" else "torch")
    if backend == "triton" and device.type != "cuda":
        raise ValueError("EngineConfig.lora_backend='triton' needs a CUDA device; "
                         "use 'torch' (or 'auto') on CPU")
    model_dir = resolve_dir(c.model, revision=c.revision, what="model",
                            allow_patterns=MODEL_FILES if c.load_format != "dummy" else
                            ["*.json", "tokenizer*", "*.jinja", "*.model", "*.txt"])
    hf_config = load_hf_config(model_dir)
    check_supported(hf_config)  # before any weight is read
    limit = getattr(hf_config, "max_position_embeddings", None) or 4096
    if c.max_model_len is not None and c.max_model_len > limit:
        raise ValueError(f"EngineConfig.max_model_len={c.max_model_len} exceeds the model's "
                         f"max_position_embeddings={limit}")
    max_len = c.max_model_len or min(limit, 4096)
    model = load_model(model_dir, hf_config, dtype=dtype, device=device, max_len=max_len,
                       load_format=c.load_format, seed=c.seed, quantization=c.quantization)
    tokenizer = Tokenizer(c.tokenizer or model_dir, model_dir=model_dir)
    loras = None
    if c.enable_lora:
        loras = LoRAManager(model, read_base_config(model_dir), c.model, max_loras=c.max_loras,
                            max_lora_rank=c.max_lora_rank, max_cpu_loras=c.max_cpu_loras,
                            dtype=lora_dtype, device=device,
                            fold=c.lora_fold and device.type == "cuda" and backend == "triton",
                            adapter_roots=c.adapter_roots,
                            max_full_module_copies=c.max_full_module_copies,
                            memory_slots=c.lora_memory_slots,
                            load_process=c.lora_load_process,
                            pinned_reserve_mb=c.pinned_reserve_mb)
    ops = get_lora_ops(backend) if c.enable_lora else None
    # longrope rotates a whole row's keys by its length (short or long factors), so a cached
    # prefix's keys are not those a longer prompt would compute: no sharing on such bases
    blocks = BlockManager(kv_blocks(c, model, max_len, device, kv_dtype), c.block_size,
                          c.enable_prefix_caching and not model.longrope)
    model.allocate_kv_cache(blocks.num_blocks, c.block_size, kv_dtype)  # after weights, slots
    graphs = None
    if device.type == "cuda" and not c.enforce_eager:
        from lorry.engine.graphs import DecodeGraphs
        graphs = DecodeGraphs(model, ops, c.max_loras, c.max_num_seqs, max_len, device,
                              c.block_size)
    runner = ModelRunner(model, ops, c.max_loras, device, graphs, c.block_size)
    scheduler = Scheduler(c.max_num_seqs, c.max_loras, blocks, c.max_num_batched_tokens,
                          mixed=c.mixed_steps, num_steps=c.num_scheduler_steps,
                          max_model_len=max_len,
                          prefill_min_tokens=prefill_min_tokens(c, device),
                          prefill_max_wait=c.prefill_max_wait)
    if loras is not None:
        runner.graph_lock = loras.gpu.layout.pin_lock
        # the LoRA kernels find each slot's adapter in the row buffers through these
        runner.slot_rows = loras.gpu.rows
        if graphs is not None:
            graphs.slot_rows = loras.gpu.rows
        scheduler.slot_memory = loras.gpu   # admission by the blocks adapters take
        loras.running_adapters = scheduler.running_adapters  # max_full_module_copies admission
    return EngineParts(device, dtype, model_dir, hf_config, model, tokenizer, max_len, backend,
                       loras, runner, scheduler)
