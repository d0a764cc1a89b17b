"""Building blocks: fused linear layers with LoRA slots, RMSNorm, rotary embeddings."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from lorry.kernels.backends import LoRAOps


@dataclass
class LoRAStep:
    """Per-step LoRA data shared by every layer: slot metadata, kernels, slots in use."""

    meta: object          # kernels.segments.LoRAMeta
    ops: LoRAOps          # lorry.kernels.backends: add_lora (add_lora_folded if folded)
    slots: frozenset      # GPU slots used by some token of this step
    # layers whose A slots are folded under their weight (LoRALinear.lora_ext) get their
    # shrink from the base matmul and run only the expand (ops.add_lora_folded)
    fold: bool = False
    # whether slots' own lm_heads / embedding LoRAs apply (False in captured CUDA graphs, whose
    # steps never include such slots: engine.runner decodes those eagerly)
    slot_modules: bool = True

    @cached_property
    def slot_index(self) -> torch.Tensor:
        """[T] long: each token's slot, max_loras for tokens without an adapter (the identity
        row of the per-slot shift/scale buffers)."""
        slots = self.meta.token_slots
        return torch.where(slots >= 0, slots, self.meta.max_loras).long()


class LoRALinear(nn.Module):
    """y = x W^T (+ b) with W fused from ``slices`` (e.g. q/k/v), plus per-token LoRA deltas.

    The slot manager assigns ``lora_a`` (per slice [L, R, in]) and ``lora_b`` (per slice
    [L, N_s, R]); ``active_slots`` says which slots hold non-zero weights for this layer.
    """

    def __init__(self, in_features: int, slices: dict[str, int], bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.slice_names = list(slices)
        self.slice_sizes = list(slices.values())
        self.slice_offsets = [sum(self.slice_sizes[:i]) for i in range(len(slices))]
        out = sum(self.slice_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None
        self.lora_a: list[torch.Tensor] | None = None
        self.lora_b: list[torch.Tensor] | None = None
        self.active_slots: set[int] = set()
        # a quantized base (engine.quant) replaces weight/bias: y = base_op(x) + lora deltas
        self.base_op: nn.Module | None = None
        # [out + S*L*R, in]: weight (its first rows) with every slot's A rows below, when the
        # slot layout folds them (engine.lora.slot_layout.FoldedA)
        self.lora_ext: torch.Tensor | None = None
        # per-slot output affine y * scale[s] + shift[s] ([L + 1, out] fp32 views, set by
        # engine.lora.extras.SlotExtras): adapter bias terms and DoRA; ``affine_slots`` use it
        self.slot_scale: torch.Tensor | None = None
        self.slot_shift: torch.Tensor | None = None
        self.affine_slots: set[int] = set()

    def load_slice(self, name: str, tensor: torch.Tensor, which: str = "weight") -> None:
        """Copy a checkpoint tensor (one of the fused slices) into place."""
        i = self.slice_names.index(name)
        dst = getattr(self, which)[self.slice_offsets[i]:self.slice_offsets[i] + self.slice_sizes[i]]
        if dst.shape != tensor.shape:
            raise ValueError(f"{name}.{which}: checkpoint shape {list(tensor.shape)} does not "
                             f"match the model's {list(dst.shape)}")
        dst.copy_(tensor)

    def fp8_rows(self) -> bool:
        """Whether the base op takes its input also as e4m3 rows with their scales (the fp8
        linears: the fused norm / silu*up kernels quantize for it in their own pass)."""
        return getattr(self.base_op, "takes_fp8_rows", False)

    def forward(self, x: torch.Tensor, lora: LoRAStep | None, xq=None) -> torch.Tensor:
        # x: [T, in] -> y: [T, out]; xq: x as (e4m3 rows, scales) for an fp8 base op, or None
        y = self._forward_lora(x, lora, xq)
        if lora is not None and self.slot_scale is not None \
                and not lora.slots.isdisjoint(self.affine_slots):
            idx = lora.slot_index                                   # [T]
            y = torch.addcmul(self.slot_shift[idx], y.float(), self.slot_scale[idx]).to(y.dtype)
        return y

    def _forward_lora(self, x: torch.Tensor, lora: LoRAStep | None, xq=None) -> torch.Tensor:
        use = (lora is not None and self.lora_a is not None
               and not lora.slots.isdisjoint(self.active_slots))
        if use and lora.fold and self.lora_ext is not None:
            # one matmul: [base | every slot's x·Aᵀ]; then each token's slot is expanded
            n = self.weight.shape[0]
            out = F.linear(x, self.lora_ext)                    # [T, out + S*L*R]
            y = out[:, :n]                                      # rows strided by out's width
            lora.ops.add_lora_folded(y, out[:, n:], self.lora_b, lora.meta, self.slice_offsets,
                                     self.in_features)
            return y
        if self.base_op is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = self.base_op(x) if xq is None else self.base_op(x, xq)
        if use:
            lora.ops.add_lora(y, x, self.lora_a, self.lora_b, lora.meta, self.slice_offsets)
        return y


class RMSNorm(nn.Module):
    """RMSNorm; ``unit_offset`` (Gemma) scales by (1 + weight) in fp32, weight starting at 0;
    ``fp32_scale`` (OLMo 2) scales by the weight in fp32 before casting back, as HF does."""

    def __init__(self, size: int, eps: float, unit_offset: bool = False, fp32_scale: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.fp32_scale = fp32_scale
        init = torch.zeros if unit_offset else torch.ones
        self.weight = nn.Parameter(init(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 like HF, then cast back
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # one fused op where torch has it
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        if self.fp32_scale:
            return (self.weight.float() * xf).to(x.dtype)
        return self.weight * xf.to(x.dtype)


@dataclass
class RopeFreqs:
    """Inverse frequencies [rot_dim/2] of one rope kind, the factor applied to cos/sin, and
    (longrope) the long-context frequencies used from ``original_max`` positions on."""

    inv: torch.Tensor
    rot_dim: int
    scale: float = 1.0
    long_inv: torch.Tensor | None = None
    original_max: int = 0


def rope_frequencies(config, head_dim: int, kind: str | None = None) -> RopeFreqs:
    """The frequencies of the config's rope (default, linear, llama3, yarn, longrope)."""
    from lorry.engine.model.arch import ROPE_TYPES, rope_parameters

    p = rope_parameters(config, kind)
    partial = p.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    dim = int(head_dim * partial)
    theta, rt = p["rope_theta"], p["rope_type"]
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    inv = 1.0 / (theta ** exponents)
    if rt == "default":
        return RopeFreqs(inv.float(), dim)
    if rt == "linear":
        return RopeFreqs((inv / p["factor"]).float(), dim)
    if rt == "llama3":
        return RopeFreqs(_llama3(inv, p).float(), dim)
    if rt == "yarn":
        return _yarn(config, p, dim)
    if rt == "longrope":
        return _longrope(config, p, dim)
    raise ValueError(f"rope_type {rt!r} is not supported; allowed: {list(ROPE_TYPES)}")


def _llama3(inv: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / low, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    mid = (wavelen <= old / low) & (wavelen >= old / high)
    return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(config, p: dict, dim: int) -> RopeFreqs:
    """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between
    (by rotations over the original context), and cos/sin scaled by the attention factor."""
    base = p["rope_theta"]
    old = p.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = p.get("factor") or config.max_position_embeddings / old
    scale = p.get("attention_factor")
    if scale is None:
        ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
        scale = (_yarn_mscale(factor, ms) / _yarn_mscale(factor, ms_all) if ms and ms_all
                 else _yarn_mscale(factor))
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp                      # 1: keep the original frequency
    inv = (1.0 / (factor * pos)) * (1 - extrapolate) + (1.0 / pos) * extrapolate
    return RopeFreqs(inv, dim, float(scale))


def _longrope(config, p: dict, dim: int) -> RopeFreqs:
    """LongRoPE (Phi-3 "su"): per-frequency short factors within the original context, long
    factors beyond it; cos/sin scaled by sqrt(1 + log(factor) / log(original context))."""
    old = p.get("original_max_position_embeddings") or getattr(
        config, "original_max_position_embeddings", None) or config.max_position_embeddings
    factor = p.get("factor") or config.max_position_embeddings / old
    scale = p.get("attention_factor")
    if scale is None:
        scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = p["rope_theta"] ** shape

    def inv(factors) -> torch.Tensor:
        f = torch.tensor(factors, dtype=torch.float32)
        if f.numel() != dim // 2:
            raise ValueError(f"longrope factors have {f.numel()} entries; the rotary dim "
                             f"{dim} needs {dim // 2}")
        return 1.0 / (f * base)

    return RopeFreqs(inv(p["short_factor"]), dim, float(scale), inv(p["long_factor"]), int(old))


class Rotary(nn.Module):
    """Precomputed cos/sin tables [max_len, rot_dim] (rotate-half layout, as in HF Llama).

    Longrope: ``cos``/``sin`` use the short factors below ``original_max`` and the long ones
    from there on (what a decode step at that position uses); ``cos_long``/``sin_long`` use
    the long factors everywhere, for every token of a row that reaches past ``original_max``
    (HF picks the factors by the sequence's length). ``rot_dim`` < head_dim: the remaining
    dims pass through unrotated (partial rotary).
    """

    def __init__(self, config, head_dim: int, max_len: int, kind: str | None = None):
        super().__init__()
        f = rope_frequencies(config, head_dim, kind)
        self.rot_dim, self.original_max = f.rot_dim, f.original_max
        cos, sin = _tables(f.inv, max_len, f.scale)
        cos_l = sin_l = None
        if f.long_inv is not None and max_len > f.original_max:
            cos_l, sin_l = _tables(f.long_inv, max_len, f.scale)
            cos[f.original_max:], sin[f.original_max:] = cos_l[f.original_max:], sin_l[f.original_max:]
        self.register_buffer("cos_long", cos_l, persistent=False)
        self.register_buffer("sin_long", sin_l, persistent=False)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype,
               last: torch.Tensor | None = None, top: torch.Tensor | None = None):
        """cos, sin [B, 1, S, rot_dim] in ``dtype`` for positions [B, S] (``last`` [B]: index
        of each row's last real token): once per step, not per layer. Longrope picks a row's
        factors by ``top`` [B], the last position of what the row prefills (a chunk of a
        longer prompt takes the prompt's), else by the row's last position here."""
        cos, sin = self.cos[positions], self.sin[positions]
        if self.cos_long is not None:
            if top is None:
                top = positions.amax(1) if last is None else \
                    positions.gather(1, last[:, None])[:, 0]
            long_rows = (top >= self.original_max)[:, None, None]                  # [B, 1, 1]
            cos = torch.where(long_rows, self.cos_long[positions], cos)
            sin = torch.where(long_rows, self.sin_long[positions], sin)
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, heads, S, D]; positions: [B, S]
        return apply_rotary(x, *self.tables(positions, x.dtype))


def _tables(inv: torch.Tensor, max_len: int, scale: float):
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv.float())
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, D]; cos/sin: [B, 1, S, rot_dim] (rotate-half layout over the first
    rot_dim dims; the rest pass through)."""
    rot_dim = cos.shape[-1]
    if rot_dim < x.shape[-1]:
        return torch.cat([apply_rotary(x[..., :rot_dim], cos, sin), x[..., rot_dim:]], dim=-1)
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin
