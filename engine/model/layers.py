"""Building blocks: fused linear layers with LoRA slots, RMSNorm, rotary embeddings."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LoRAStep:
    """Per-step LoRA data shared by every layer: slot metadata, kernels, slots in use."""

    meta: object          # kernels.segments.LoRAMeta
    ops: object           # module/object with add_lora
    slots: frozenset      # GPU slots used by some token of this step
    # CUDA: a side stream on which each layer's LoRA delta is computed while the base matmul
    # runs on the current stream (None: LoRA after the base matmul, on the same stream)
    stream: object = None


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
        if use and lora.stream is not None:
            return self._forward_overlapped(x, lora)
        y = self._base(x)
        if use:
            lora.ops.add_lora(y, x, self.lora_a, self.lora_b, lora.meta, self.slice_offsets)
        return y

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) if self.base_op is None else self.base_op(x)

    def _forward_overlapped(self, x: torch.Tensor, lora: LoRAStep) -> torch.Tensor:
        """The LoRA delta on ``lora.stream`` while the base matmul runs, then y += delta.

        The small LoRA kernels leave most of the GPU idle, and so does a decode-sized base
        matmul; side by side they share it. (Memory: the side stream waits for the current
        one before every layer, so a buffer freed here is reused there only after its last
        reader; the current stream waits for the side one before it reads the delta.)
        """
        main = torch.cuda.current_stream(x.device)
        lora.stream.wait_stream(main)
        with torch.cuda.stream(lora.stream):
            delta = torch.zeros(x.shape[0], sum(self.slice_sizes), dtype=x.dtype, device=x.device)
            lora.ops.add_lora(delta, x, self.lora_a, self.lora_b, lora.meta, self.slice_offsets)
        y = self._base(x)
        main.wait_stream(lora.stream)
        return y.add_(delta)


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
