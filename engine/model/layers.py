"""Building blocks: fused linear layers with LoRA slots, RMSNorm, rotary embeddings."""
from __future__ import annotations

import math
from dataclasses import dataclass

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

    def load_slice(self, name: str, tensor: torch.Tensor, which: str = "weight") -> None:
        """Copy a checkpoint tensor (one of the fused slices) into place."""
        i = self.slice_names.index(name)
        dst = getattr(self, which)[self.slice_offsets[i]:self.slice_offsets[i] + self.slice_sizes[i]]
        if dst.shape != tensor.shape:
            raise ValueError(f"{name}.{which}: checkpoint shape {list(tensor.shape)} does not "
                             f"match the model's {list(dst.shape)}")
        dst.copy_(tensor)

    def forward(self, x: torch.Tensor, lora: LoRAStep | None) -> torch.Tensor:
        # x: [T, in] -> y: [T, out]
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
        y = F.linear(x, self.weight, self.bias) if self.base_op is None else self.base_op(x)
        if use:
            lora.ops.add_lora(y, x, self.lora_a, self.lora_b, lora.meta, self.slice_offsets)
        return y


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 like HF, then cast back
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # one fused op where torch has it
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(config, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] for the config's rope type (default, linear, llama3)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / params["factor"]).float()
    if kind == "llama3":
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        return torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled).float()
    raise ValueError(f"rope_type {kind!r} is not supported; allowed: default, linear, llama3")


class Rotary(nn.Module):
    """Precomputed cos/sin tables [max_len, head_dim] (rotate-half layout, as in HF Llama)."""

    def __init__(self, config, head_dim: int, max_len: int):
        super().__init__()
        inv = rope_inv_freq(config, head_dim)
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [B, 1, S, D] in ``dtype`` for positions [B, S]: once per step, not per layer."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # x: [B, heads, S, D]; positions: [B, S]
        return apply_rotary(x, *self.tables(positions, x.dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, S, D]; cos/sin: [B, 1, S, D] (rotate-half layout)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin
