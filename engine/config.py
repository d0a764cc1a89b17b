"""EngineConfig: every engine setting in one dataclass, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the slot widths vLLM allows
DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")
LORA_BACKENDS = ("auto", "torch", "triton")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
BLOCK_SIZES = (1, 8, 16, 32, 64, 128)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # vLLM's names ("fp8" is e4m3)
QUANTIZATIONS = (None, "bnb-nf4", "bnb-fp4", "bnb-int8", "torchao-int8", "torchao-int4",
                 "gptq", "awq", "fp8")


def _positive_int(name: str, value, allow_none: bool = False, least: int = 1) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"EngineConfig.{name}={value!r} is invalid: must be an int >= {least}")


def _choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"EngineConfig.{name}={value!r} is invalid: allowed {list(allowed)}")


@dataclass
class EngineConfig:
    """Settings of one engine (one base model, its adapter caches, its batch limits).

    Parameters
    ----------
    model : str
        Local HF directory or Hub repo id of the base model.
    tokenizer : str, optional
        Tokenizer directory or repo id (defaults to ``model``).
    revision : str, optional
        Hub revision of the base model.
    dtype : {"auto", "float32", "float16", "bfloat16"}
        "auto": bfloat16 on CUDA, float32 on CPU.
    device : {"auto", "cpu", "cuda"}
    enable_lora : bool
    max_loras : int
        GPU adapter slots: the most distinct adapters in one model step.
    max_lora_rank : int
        Slot width; one of 1, 8, 16, 32, 64, 128, 256, 320, 512.
    lora_memory_slots : int, optional
        GPU memory for LoRA weights, in ``max_lora_rank``-wide slots (None: ``max_loras``).
        The resident adapters share it by rank (engine.lora.gpu_slots: blocks of 16-row
        pages), so ``max_loras`` above it lets more low-rank adapters run at once: e.g. 32
        rank-64 slots' memory holds 128 adapters of rank 16.
    max_cpu_loras : int, optional
        CPU LRU cache size (>= max_loras; None means max_loras).
    lora_dtype : {"auto", "float32", "float16", "bfloat16"}
        dtype of the slot buffers ("auto" = the model dtype).
    lora_backend : {"auto", "torch", "triton"}
        "auto": triton on CUDA, torch on CPU.
    max_num_seqs : int
        Sequences decoded together (KV cache rows).
    max_model_len : int, optional
        Prompt + generated tokens per sequence (None: the model's limit, at most 4096).
    load_format : {"auto", "safetensors", "dummy"}
        "dummy" builds random weights from config.json (benchmarks).
    seed : int
        Seed for dummy weights and for requests without their own seed.
    quantization : str, optional
        None, "bnb-nf4", "bnb-fp4", "bnb-int8", "torchao-int8", "torchao-int4", "gptq",
        "awq" or "fp8": quantize the base linear weights (adapters stay in lora_dtype). A
        GPTQ/AWQ checkpoint is detected from its config.json; bnb/torchao quantize at load
        (extra ``quant``); "fp8" (vLLM's name, torch alone) is W8A8 in float8 e4m3: weights
        per output channel at load, activations per token at each call, torch._scaled_mm
        (CUDA: compute capability 8.9 or newer).
    enforce_eager : bool
        False (default): on CUDA, decode steps are captured in CUDA graphs per batch-size
        bucket and replayed; True: always run eagerly (as vLLM's ``enforce_eager``).
    max_num_batched_tokens : int
        Tokens per step (vLLM's name): each decoding sequence's next token, and prompt chunks
        with the rest (longer prompts are prefilled in chunks over several steps). 8192 by
        default, as vLLM's offline engine on large GPUs: the bulk workload on an H100 ran
        1.05x faster than at 2048 (docs/BENCHMARKS.md); a smaller budget gives the decoding
        rows riding in a prompt step shorter steps.
    prefill_min_tokens : int, optional
        Mixed steps (with ``mixed_steps``): while rows decode in a batch at least half full,
        new prompts wait in decode rounds until the free rows would take this many prompt
        tokens (counted before prefix-cache hits; at most what the step's budget leaves
        the decode rows), as TGI's ``waiting_served_ratio``; never a preempted row's
        recompute, nor waiters the free rows all take. On
        CUDA a step carrying prompt work runs eagerly and its host takes tens of
        milliseconds to issue it however few its tokens, so fewer, larger prompt steps finish
        a bulk workload sooner (1.057x on an H100, docs/BENCHMARKS.md); a hold lasts at
        most ``prefill_max_wait`` device steps. None (the default): 4096 on CUDA, 0
        elsewhere; 0: every step admits what fits (also with ``mixed_steps=False``).
    prefill_max_wait : int
        The most device steps a hold for ``prefill_min_tokens`` lasts (default 32: four
        rounds of ``num_scheduler_steps`` 8; a round is cut to what is left); then the
        waiters are admitted whatever their tokens. 0 turns the hold off.
    mixed_steps : bool
        True (default, as vLLM's chunked prefill): a step that prefills prompt chunks also
        decodes every running sequence; steps without prompt work replay CUDA graphs. False:
        prefill and decode steps alternate (each decode step in a graph).
    num_scheduler_steps : int
        Decode steps run back to back on the device per scheduling round (vLLM's multi-step
        scheduling): the tokens a step picks feed the next step on the device, and the host
        schedules and reads the tokens once per round, so its per-step bookkeeping no longer
        leaves the GPU idle. Used for decode-only steps whose rows need no host sampling
        (``SamplingParams.device_sampled``: no penalties, no logprobs, no seed of their own
        unless greedy; others decode a step at a time); greedy tokens are the same as with
        1. A row that finishes inside a round computes the round's remaining steps for
        nothing (discarded), and new requests join at round boundaries. Default 8; 1: off.
    lora_fold : bool
        CUDA: keep each layer's LoRA A slots as extra rows under its base weight, so that a
        decode step's base matmul also computes every slot's x·Aᵀ and only the expand kernel
        runs for LoRA (True, the default); False: separate shrink kernels.
    lora_load_process : bool
        Background adapter loads (disk to the CPU cache) in a process of their own, which
        shares no GIL with the engine's thread: a load in a thread makes ~150 torch calls,
        each handing the GIL over, and every kernel launch of the engine's thread hands it
        back. The process starts with the engine (a few seconds, in the background) and
        returns each staging buffer through a file in shared memory; a load it cannot finish
        (it died) fails that request with a ``LoRAError`` and the next load starts a new one.
        False (the default): a thread, until a GPU run measures the process's gain
        (docs/BENCHMARKS.md). ``add_lora`` always loads in the caller's thread.
    pinned_reserve_mb : int, optional
        CUDA with LoRA: MiB of pinned host memory reserved once, at the first pinned
        allocation, for the CPU cache's staging buffers (torch's
        ``pinned_reserve_segment_size_mb``), so a cold adapter load takes no
        ``cudaHostAlloc``, whose driver lock stalls the engine's kernel launches. None (the
        default): room for ``max_cpu_loras`` adapters at ``max_lora_rank`` over every target
        module (as the allocator rounds them), at most a quarter of host memory per GPU of
        the host (a worker per GPU); 0: off. One segment per process (the first engine's
        size); an operator's PYTORCH_ALLOC_CONF (or PYTORCH_CUDA_ALLOC_CONF) that names the
        key wins. ``cache_stats()["cpu"]["pinned_reserve"]`` tells which.
    adapter_roots : tuple of str, optional
        Directories a local adapter (and each of its files, symlinks resolved) must lie in,
        checked at every load; a path elsewhere is refused with ``AdapterSourceError``. None
        (the default, for library use): local adapters may be anywhere. Hub ids are never
        looked up on disk either way (``engine.lora.sources``).
    block_size : int
        Tokens per KV cache block (1, 8, 16, 32, 64 or 128; 16 as vLLM).
    enable_prefix_caching : bool
        True (default, as vLLM): full blocks of prompt KV are shared between sequences with
        the same leading tokens under the same adapter (id, path, revision).
    gpu_memory_utilization : float
        CUDA: the share of the GPU's memory the engine may take; the KV block pool gets what
        is left of it after the weights and the LoRA slots (vLLM's name). 0 < x <= 1.
    kv_cache_dtype : {"auto", "fp8", "fp8_e4m3"}
        "auto" (default): keys and values are kept in the model dtype. "fp8" (= "fp8_e4m3",
        vLLM's names): kept as float8 e4m3 with a scale of 1.0, as vLLM without calibrated
        scales: half the bytes a token takes, so twice the tokens in the same memory and
        half the keys/values a decode step reads. Every attention (the first prefill, chunks
        after cached prefixes, decode) sees the keys and values rounded to e4m3 (saturating
        at +-448), so greedy tokens follow the fp8 cache, not the model dtype's. CUDA needs
        compute capability 8.9 or newer (Ada, Hopper) for the Triton kernels.
    num_kv_blocks : int, optional
        The KV pool's size in blocks, overriding the sizing above (CPU default: room for
        ``max_num_seqs`` sequences of ``max_model_len``). At least one sequence of
        ``max_model_len`` tokens must fit.
    max_full_module_copies : int, optional
        The most full trained matrices (an adapter's modules_to_save lm_head or embed_tokens,
        vocab x hidden each) the GPU slots hold together; None (the default): no limit. Idle
        holders are evicted to make room; a request waits while running adapters hold them,
        and fails (``LoRAError``) when pinned adapters or the adapter alone exceed it.
    """

    model: str
    tokenizer: str | None = None
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    enable_lora: bool = True
    max_loras: int = 4
    max_lora_rank: int = 16
    lora_memory_slots: int | None = None
    max_cpu_loras: int | None = None
    lora_dtype: str = "auto"
    lora_backend: str = "auto"
    max_num_seqs: int = 64
    max_model_len: int | None = None
    load_format: str = "auto"
    seed: int = 0
    quantization: str | None = None
    enforce_eager: bool = False
    max_num_batched_tokens: int = 8192
    mixed_steps: bool = True
    prefill_min_tokens: int | None = None
    prefill_max_wait: int = 32
    num_scheduler_steps: int = 8
    lora_fold: bool = True
    lora_load_process: bool = False
    pinned_reserve_mb: int | None = None
    adapter_roots: tuple[str, ...] | None = None
    max_full_module_copies: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None
    kv_cache_dtype: str = "auto"

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"EngineConfig.model={self.model!r} is invalid: "
                             "give a local model directory or a Hub repo id")
        _positive_int("max_loras", self.max_loras)
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"EngineConfig.max_lora_rank={self.max_lora_rank!r} is invalid: "
                             f"allowed {list(LORA_RANKS)}")
        _positive_int("lora_memory_slots", self.lora_memory_slots, allow_none=True)
        _positive_int("max_cpu_loras", self.max_cpu_loras, allow_none=True)
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"EngineConfig.max_cpu_loras={self.max_cpu_loras} is invalid: "
                             f"must be >= max_loras ({self.max_loras})")
        _positive_int("max_num_seqs", self.max_num_seqs)
        _positive_int("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive_int("num_scheduler_steps", self.num_scheduler_steps)
        _positive_int("prefill_min_tokens", self.prefill_min_tokens, allow_none=True, least=0)
        _positive_int("prefill_max_wait", self.prefill_max_wait, least=0)
        _positive_int("max_model_len", self.max_model_len, allow_none=True)
        _choice("dtype", self.dtype, DTYPES)
        _choice("lora_dtype", self.lora_dtype, DTYPES)
        _choice("device", self.device, DEVICES)
        _choice("lora_backend", self.lora_backend, LORA_BACKENDS)
        _choice("load_format", self.load_format, LOAD_FORMATS)
        if not isinstance(self.enable_lora, bool):
            raise ValueError(f"EngineConfig.enable_lora={self.enable_lora!r} must be a bool")  # noqa: TRY004
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"EngineConfig.seed={self.seed!r} is invalid: must be an int")  # noqa: TRY004
        _choice("quantization", self.quantization, QUANTIZATIONS)
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"EngineConfig.enforce_eager={self.enforce_eager!r} must be a bool")  # noqa: TRY004
        if not isinstance(self.lora_fold, bool):
            raise ValueError(f"EngineConfig.lora_fold={self.lora_fold!r} must be a bool")  # noqa: TRY004
        if self.pinned_reserve_mb is not None and (
                isinstance(self.pinned_reserve_mb, bool)
                or not isinstance(self.pinned_reserve_mb, int) or self.pinned_reserve_mb < 0):
            raise ValueError(f"EngineConfig.pinned_reserve_mb={self.pinned_reserve_mb!r} is "
                             "invalid: must be None (automatic), 0 (off) or MiB >= 1")
        if not isinstance(self.lora_load_process, bool):
            raise ValueError(f"EngineConfig.lora_load_process={self.lora_load_process!r} "  # noqa: TRY004
                             "must be a bool")
        if self.adapter_roots is not None:
            if isinstance(self.adapter_roots, str) or not all(
                    isinstance(r, str) and r for r in self.adapter_roots):
                raise ValueError(f"EngineConfig.adapter_roots={self.adapter_roots!r} is invalid: "
                                 "give a list of directories (or None for no confinement)")
            self.adapter_roots = tuple(self.adapter_roots)
        _choice("block_size", self.block_size, BLOCK_SIZES)
        if not isinstance(self.mixed_steps, bool):
            raise ValueError(f"EngineConfig.mixed_steps={self.mixed_steps!r} must be a bool")  # noqa: TRY004
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"EngineConfig.enable_prefix_caching={self.enable_prefix_caching!r} "  # noqa: TRY004
                             "must be a bool")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 < u <= 1:
            raise ValueError(f"EngineConfig.gpu_memory_utilization={u!r} is invalid: must be a "
                             "number in (0, 1]")
        _choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        _positive_int("num_kv_blocks", self.num_kv_blocks, allow_none=True)
        m = self.max_full_module_copies
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"EngineConfig.max_full_module_copies={m!r} is invalid: must be an "
                             "int >= 0 (or None for no limit)")
