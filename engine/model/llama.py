"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over a static per-sequence KV cache.

Batches are padded [B, S] (prefill: S = longest new prompt; decode: S = 1). Every layer works
on the flattened tokens [B*S, H] so one LoRA metadata object serves all projections.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorry.engine.model.layers import LoRALinear, LoRAStep, RMSNorm, Rotary, apply_rotary

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
# fused module -> the checkpoint/PEFT modules it packs (nano-vllm's packed_modules_mapping)
PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                  "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
_TRITON_OPS: list = []   # [fused_ops, decode_attention] once imported; [None] if unavailable


def triton_ops():
    """(kernels.fused_ops, kernels.decode_attention), imported on first CUDA use (None if
    Triton is missing: the torch code runs instead)."""
    if not _TRITON_OPS:
        try:
            from lorry.kernels import decode_attention, fused_ops
            _TRITON_OPS.append((fused_ops, decode_attention))
        except ImportError:
            _TRITON_OPS.append(None)
    return _TRITON_OPS[0]


@dataclass
class Batch:
    """Inputs of one model step (all tensors on the model's device)."""

    positions: torch.Tensor      # [B, S] absolute positions (padding repeats the last one)
    cache_rows: torch.Tensor | None  # [B] KV cache row of each sequence (None: no cache write)
    prefill: bool
    kv_len: int = 0              # decode: keys to attend (max position + 1, host int)
    row_start: int | None = None  # decode: rows are row_start.. row_start+B-1 (views, no gather)
    lora: LoRAStep | None = None
    chunked: bool = False        # prefill of prompt chunks after cached prefixes (kv_len keys)


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        self.qkv_proj = LoRALinear(config.hidden_size, {"q_proj": q, "k_proj": kv, "v_proj": kv}, bias)
        self.o_proj = LoRALinear(q, {"o_proj": config.hidden_size},
                                 bool(getattr(config, "attention_bias", False)))
        self.k_cache: torch.Tensor | None = None  # [max_num_seqs, kv_heads, max_len, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, batch: Batch, rope, shape) -> torch.Tensor:
        # x: [T, H] with T = B*S; rope: (cos, sin) [B, 1, S, D] from Rotary.tables
        B, S = shape
        h, kvh, D = self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv_proj(x, batch.lora)
        qk, v = qkv.split([(h + kvh) * D, kvh * D], dim=-1)
        # q and k rotated together: one set of elementwise kernels per layer
        qk = apply_rotary(qk.view(B, S, h + kvh, D).transpose(1, 2), *rope)  # [B, h+kvh, S, D]
        q, k = qk.split([h, kvh], dim=1)                                # [B, h|kvh, S, D]
        v = v.view(B, S, kvh, D).transpose(1, 2)                        # [B, kvh, S, D]
        rows = batch.cache_rows
        if batch.prefill and batch.chunked:
            # a chunk continues cached prompts: write it at its positions (padding positions
            # lie past each chunk, or at the never-read last position), then attend to the
            # cached prefix + causally within the chunk. positions: [B, S]; keys [B, kvh, n, D]
            self.k_cache[rows[:, None], :, batch.positions] = k.transpose(1, 2)
            self.v_cache[rows[:, None], :, batch.positions] = v.transpose(1, 2)
            n = batch.kv_len
            mask = torch.arange(n, device=x.device) <= batch.positions[:, :, None]  # [B, S, n]
            out = F.scaled_dot_product_attention(q, self.k_cache[rows, :, :n],
                                                 self.v_cache[rows, :, :n], attn_mask=mask[:, None],
                                                 enable_gqa=self.kv_heads != self.heads)
        elif batch.prefill:
            if rows is not None:
                # rows are written from position 0; padding slots get overwritten by later decodes
                self.k_cache[rows, :, :S] = k
                self.v_cache[rows, :, :S] = v
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                 enable_gqa=self.kv_heads != self.heads)
        else:
            pos = batch.positions[:, 0]
            self.k_cache[rows, :, pos] = k[:, :, 0]
            self.v_cache[rows, :, pos] = v[:, :, 0]
            n = batch.kv_len
            if batch.row_start is not None:  # consecutive rows: views instead of a gather copy
                r = slice(batch.row_start, batch.row_start + B)
                keys, values = self.k_cache[r, :, :n], self.v_cache[r, :, :n]  # [B, kvh, n, D]
            else:
                keys = self.k_cache[rows, :, :n]
                values = self.v_cache[rows, :, :n]
            mask = torch.arange(n, device=x.device)[None, :] <= pos[:, None]  # [B, n]
            out = self._decode_attention(q, keys, values, mask)
        out = out.transpose(1, 2).reshape(B * S, self.heads * self.head_dim)
        return self.o_proj(out, batch.lora)


    def decode_fused(self, x: torch.Tensor, batch: Batch, rotary: Rotary) -> torch.Tensor:
        """CUDA decode through Triton: rotary of q/k in place with the k/v cache write, then
        flash-decode attention bounded by each row's position. x: [B, H] -> [B, H]."""
        fused_ops, attention = triton_ops()
        h, kvh, D = self.heads, self.kv_heads, self.head_dim
        pos = batch.positions.reshape(-1)                               # [B]
        qkv = self.qkv_proj(x, batch.lora)                              # [B, (h+2kvh)*D]
        fused_ops.rotary_qk_(qkv, pos, rotary.cos, rotary.sin, h, kvh, D,
                             self.k_cache, self.v_cache, batch.cache_rows)
        out = attention.decode_attention(qkv[:, :h * D], self.k_cache, self.v_cache,
                                         batch.cache_rows, pos)         # [B, h*D]
        return self.o_proj(out, batch.lora)

    def _decode_attention(self, q, keys, values, mask):
        """One query per sequence, grouped by KV head, so K/V are read once and never
        repeated per query head. q: [B, h, 1, D]; keys/values: [B, kvh, n, D]; mask: [B, n]."""
        B, g = q.shape[0], self.heads // self.kv_heads
        qg = q.reshape(B, self.kv_heads, g, self.head_dim)                   # [B, kvh, g, D]
        scores = (qg @ keys.transpose(-1, -2)).float() * self.head_dim ** -0.5  # [B, kvh, g, n]
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = scores.softmax(-1).to(values.dtype) @ values                   # [B, kvh, g, D]
        return out.reshape(B, self.heads, 1, self.head_dim)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        i, bias = config.intermediate_size, bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = LoRALinear(config.hidden_size, {"gate_proj": i, "up_proj": i}, bias)
        self.down_proj = LoRALinear(i, {"down_proj": config.hidden_size}, bias)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; allowed: silu")

    def forward(self, x: torch.Tensor, lora: LoRAStep | None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, lora)

    def forward_fused(self, x: torch.Tensor, lora: LoRAStep | None) -> torch.Tensor:
        return self.down_proj(triton_ops()[0].silu_mul(self.gate_up_proj(x, lora)), lora)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, batch, rope, shape):
        x = x + self.self_attn(self.input_layernorm(x), batch, rope, shape)
        return x + self.mlp(self.post_attention_layernorm(x), batch.lora)

    def forward_fused(self, x, residual, batch, rope, shape, rotary):
        """CUDA path: residual adds fused into the norms (x + residual is carried in
        ``residual``, updated in place), Triton decode attention and silu*up.
        x: [T, H] (sublayer output; the embeddings for the first layer) -> (x, residual)."""
        add_rmsnorm = triton_ops()[0].add_rmsnorm
        h, residual = add_rmsnorm(x, residual, self.input_layernorm.weight, self.input_layernorm.eps)
        if batch.prefill:
            h = self.self_attn(h, batch, rope, shape)
        else:
            h = self.self_attn.decode_fused(h, batch, rotary)
        norm = self.post_attention_layernorm
        h, residual = add_rmsnorm(h, residual, norm.weight, norm.eps)
        return self.mlp.forward_fused(h, batch.lora), residual


class LlamaForCausalLM(nn.Module):
    """The decoder plus LM head; parameter names follow the HF checkpoints (fused q/k/v, gate/up)."""

    def __init__(self, config, max_len: int):
        super().__init__()
        if config.model_type not in SUPPORTED_TYPES:
            raise ValueError(f"model_type {config.model_type!r} is not supported; "
                             f"allowed: {list(SUPPORTED_TYPES)}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size), requires_grad=False)
        attn = self.layers[0].self_attn
        self.rotary = Rotary(config, attn.head_dim, max_len)
        # on CUDA, the Triton kernels of kernels.fused_ops / kernels.decode_attention
        self.use_triton_ops = True

    def lm_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head

    def allocate_kv_cache(self, max_num_seqs: int, max_len: int) -> None:
        for layer in self.layers:
            a = layer.self_attn
            shape = (max_num_seqs, a.kv_heads, max_len, a.head_dim)
            p = self.embed_tokens.weight
            a.k_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)
            a.v_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)

    def forward(self, input_ids: torch.Tensor, batch: Batch,
                last_index: torch.Tensor | None) -> torch.Tensor:
        """input_ids: [B, S]; last_index: [B] position whose logits to return -> [B, V]
        (None: logits of every position -> [B, S, V])."""
        B, S = input_ids.shape
        x = self.embed_tokens(input_ids.reshape(-1))                     # [T, H]
        if self.use_triton_ops and x.is_cuda and triton_ops() is not None:
            return self._forward_fused(x, batch, last_index, B, S)
        rope = self.rotary.tables(batch.positions, x.dtype)             # 2 x [B, 1, S, D]
        for layer in self.layers:
            x = layer(x, batch, rope, (B, S))
        x = x.view(B, S, -1)
        if last_index is not None:
            x = x[torch.arange(B, device=x.device), last_index]         # [B, H]
        return F.linear(self.norm(x), self.lm_weight()).float()

    def _forward_fused(self, x, batch, last_index, B, S):
        # decode: the rotary kernel reads cos/sin at each position, no per-step tables
        rope = self.rotary.tables(batch.positions, x.dtype) if batch.prefill else None
        residual = None
        for layer in self.layers:
            x, residual = layer.forward_fused(x, residual, batch, rope, (B, S), self.rotary)
        if last_index is not None and S > 1:                             # S = 1: the only one
            pick = torch.arange(B, device=x.device) * S + last_index     # [B] flat token rows
            x, residual = x[pick], residual[pick]
        x, _ = triton_ops()[0].add_rmsnorm(x, residual, self.norm.weight, self.norm.eps)
        logits = F.linear(x, self.lm_weight()).float()                   # [B or B*S, V]
        return logits if last_index is not None else logits.view(B, S, -1)

    def lora_layers(self):
        """Yield (layer index, fused module name, LoRALinear) for every LoRA-capable layer."""
        for i, layer in enumerate(self.layers):
            yield i, "qkv_proj", layer.self_attn.qkv_proj
            yield i, "o_proj", layer.self_attn.o_proj
            yield i, "gate_up_proj", layer.mlp.gate_up_proj
            yield i, "down_proj", layer.mlp.down_proj
