"""Random multi-adapter LoRA problems and a plain per-row loop reference for kernel tests;
the attention kernels' shared checks."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch

from lorry.kernels.segments import LoRAMeta, build_lora_meta

MIXES = ("distinct", "uniform", "skewed", "identical", "some_without", "all_without")


def token_slots(mix: str, num_tokens: int, max_loras: int, gen: torch.Generator) -> torch.Tensor:
    """Slot per token ([T] int32, -1 = no adapter) for one adversarial mix."""
    T, L = num_tokens, max_loras
    if mix == "distinct":                      # every token its own slot (L >= T)
        slots = torch.randperm(L, generator=gen)[:T]
    elif mix in ("uniform", "identical"):      # identical: all slots carry the same weights
        slots = torch.randint(0, L, (T,), generator=gen)
        if mix == "uniform":
            slots[:] = L - 1
    elif mix == "skewed":                      # most tokens on one slot, a few elsewhere
        slots = torch.where(torch.rand(T, generator=gen) < 0.8, torch.full((T,), 1),
                            torch.randint(0, L, (T,), generator=gen))
    elif mix == "some_without":
        slots = torch.randint(-1, L, (T,), generator=gen)
        slots[0], slots[-1] = -1, 2            # at least one row each way (when T > 1)
    elif mix == "all_without":
        slots = torch.full((T,), -1)
    else:
        raise ValueError(f"unknown mix {mix!r}")
    return slots.to(torch.int32)


@dataclass
class Problem:
    x: torch.Tensor                  # [T, H]
    lora_a: list[torch.Tensor]       # per slice [L, R, H], rows >= rank(slot) zero
    lora_b: list[torch.Tensor]       # per slice [L, N_s, R], columns >= rank(slot) zero
    y: torch.Tensor                  # [T, sum N_s], the base output before LoRA
    slots: torch.Tensor              # [T] int32
    meta: LoRAMeta
    offsets: list[int]


def make_problem(*, num_tokens: int, hidden: int, widths: list[int], max_rank: int,
                 ranks: list[int], mix: str, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> Problem:
    """Adapters of the given ranks (cycled over slots) zero-padded into max_rank-wide slots."""
    gen = torch.Generator().manual_seed(seed)
    L = max(num_tokens, 3) if mix == "distinct" else 5
    slots = token_slots(mix, num_tokens, L, gen)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5

    lora_a, lora_b = [], []
    for n in widths:
        a, b = rand(L, max_rank, hidden), rand(L, n, max_rank)
        for slot in range(L):
            r = ranks[slot % len(ranks)]
            a[slot, r:] = 0
            b[slot, :, r:] = 0
        if mix == "identical":
            a[:], b[:] = a[0].clone(), b[0].clone()
        lora_a.append(a.to(dtype=dtype, device=device))
        lora_b.append(b.to(dtype=dtype, device=device))
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype=dtype, device=device)
    y = torch.randn(num_tokens, sum(widths), generator=gen).to(dtype=dtype, device=device)
    slots = slots.to(device)
    return Problem(x, lora_a, lora_b, y, slots, build_lora_meta(slots, L), offsets)


def loop_reference(p: Problem) -> torch.Tensor:
    """y + LoRA(x), one row at a time in float64: the plainest statement of the semantics."""
    y = p.y.double().cpu().clone()
    x = p.x.double().cpu()
    for t, slot in enumerate(p.slots.tolist()):
        if slot < 0:
            continue
        for a, b, off in zip(p.lora_a, p.lora_b, p.offsets):
            a_s, b_s = a[slot].double().cpu(), b[slot].double().cpu()
            y[t, off:off + b_s.shape[0]] += b_s @ (a_s @ x[t])
    return y


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


ATTENTION_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def skip_interpreted_bf16(dtype, device):
    """bf16 runs on CUDA only (the bf16 cases passed on an H200 and an H100, 2026-12-06):
    the interpreter's bf16 dot is wrong, not the kernels."""
    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("Triton 3.x's CPU interpreter multiplies bf16 dot operands as raw bits")


def relative_error(out, ref) -> float:
    """|out - ref| / |ref| over the whole tensor, in fp32."""
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def check_huge_queries_over_fp8(case) -> None:
    """A paged-attention case (q, k_cache, v_cache, run(), ref(); bf16): over an e4m3 cache,
    queries of +-1e5 (bf16 values past fp16's 65,504; the kernels' fp16 dots take the query
    times the power of two nearest the logit scale) give the reference's attention, not NaN."""
    case.k_cache, case.v_cache = (x.to(torch.float8_e4m3fn) for x in (case.k_cache,
                                                                      case.v_cache))
    case.q = torch.where(case.q > 0, 1e5, -1e5).to(torch.bfloat16) * (case.q.abs() > 0.5)
    out = case.run()
    assert torch.isfinite(out).all()
    case.q = case.q.float()   # the reference in fp32: bf16 logits of ~1e5 are 512 apart
    assert relative_error(out, case.ref()) < ATTENTION_TOL[torch.bfloat16]


def check_attention(out, ref, dtype):
    """An attention kernel's output against its torch reference: fp32 within one reduction
    order (IEEE dots); half types by relative error."""
    assert out.dtype == dtype and out.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    else:
        rel = relative_error(out, ref)
        assert rel < ATTENTION_TOL[dtype], rel


def unspecialized(kernel) -> set:
    """The arguments ``@triton.jit(do_not_specialize=...)`` names (compiled or interpreted)."""
    names = getattr(kernel, "do_not_specialize", None)
    if names is None:                                   # the interpreter's wrapper
        names = (getattr(kernel, "kwargs", None) or {}).get("do_not_specialize")
    return set(names or ())


class Launches:
    """Stands in for a Triton kernel: records each launch's compile key (its constexprs and
    launch options, the specialization class of each specialized integer, each pointer's
    element type and 16-byte alignment) and its launch plan (the constexprs and options
    alone), then launches it unless ``run`` is false."""

    def __init__(self, kernel, run: bool = True):
        self.kernel, self.run, self.keys, self.plans = kernel, run, set(), set()
        fn = getattr(kernel, "fn", kernel)
        self.names = list(inspect.signature(fn).parameters)
        self.unspecialized = unspecialized(kernel)

    def __getitem__(self, grid):
        def launch(*args, **kw):
            ints = tuple((name, 1 if a == 1 else 16 if a % 16 == 0 else 0)
                         for name, a in zip(self.names, args)
                         if isinstance(a, int) and not isinstance(a, bool)
                         and name not in self.unspecialized)
            # a pointer's element type and whether its address is a multiple of 16 bytes
            ints += tuple((name, str(a.dtype), a.data_ptr() % 16 == 0)
                          for name, a in zip(self.names, args) if isinstance(a, torch.Tensor))
            plan = tuple(sorted(kw.items()))
            self.keys.add((ints, plan))
            self.plans.add(plan)
            if self.run:
                return self.kernel[grid](*args, **kw)
        return launch


KERNEL_MODULES = ("fused_ops", "decode_attention", "prefill_attention", "triton_lora",
                  "lora_decode", "triton_kernels", "fp8_matmul")


def record_kernels(monkeypatch, run: bool = True) -> dict[str, Launches]:
    """Every Triton kernel the engine launches from Python (a ``*kernel*`` name in one of
    lorry.kernels' modules), replaced by a Launches recorder wherever a module holds it;
    returns {kernel name: its recorder}."""
    import importlib

    from triton.runtime import KernelInterface
    recs: dict[str, Launches] = {}
    for m in KERNEL_MODULES:
        mod = importlib.import_module(f"lorry.kernels.{m}")
        for name, obj in list(vars(mod).items()):
            if "kernel" in name and isinstance(obj, KernelInterface):
                key = getattr(obj, "fn", obj).__name__
                rec = recs.setdefault(key, Launches(obj, run))
                monkeypatch.setattr(mod, name, rec)
    return recs
