"""The decoder of every supported base (Llama, Mistral, Qwen2/3, Phi-3/4, Gemma 2/3 text,
Granite, OLMo 2) over a paged KV cache; engine.model.arch says how the bases differ.

Batches are padded [B, S] (prefill: S = longest new prompt; decode: S = 1). Every layer works
on the flattened tokens [T, H] (the real tokens of the [B*S] layout when packed, then a mixed
step's decode rows) so one LoRA metadata object serves all projections.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorry.engine.model import attention
from lorry.engine.model.arch import SUPPORTED_TYPES, Arch
from lorry.engine.model.attention import Attention, Batch, triton_ops
from lorry.engine.model.layers import LoRALinear, LoRAStep, RMSNorm, Rotary

__all__ = ["PACKED_MODULES", "SUPPORTED_TYPES", "Batch", "LlamaForCausalLM", "triton_ops"]
# fused module -> the checkpoint/PEFT modules it packs (nano-vllm's packed_modules_mapping);
# bases with fused checkpoints (Phi-3) name the fused modules themselves
PACKED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                  "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class MLP(nn.Module):
    def __init__(self, config, arch: Arch):
        super().__init__()
        i, bias = config.intermediate_size, arch.mlp_bias
        slices = {"gate_up_proj": 2 * i} if arch.fused_checkpoint else {"gate_proj": i, "up_proj": i}
        self.gate_up_proj = LoRALinear(config.hidden_size, slices, bias)
        self.down_proj = LoRALinear(i, {"down_proj": config.hidden_size}, bias)
        self.gelu = arch.act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor, lora: LoRAStep | None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        return self.down_proj(act * up, lora)

    def forward_fused(self, x: torch.Tensor, lora: LoRAStep | None, xq=None) -> torch.Tensor:
        # xq: x quantized for an fp8 gate_up; an fp8 down's input is quantized by silu*up
        gate_up = self.gate_up_proj(x, lora, xq)
        if self.down_proj.fp8_rows():
            act, aq = triton_ops()[0].silu_mul(gate_up, fp8=True)
            return self.down_proj(act, lora, aq)
        return self.down_proj(triton_ops()[0].silu_mul(gate_up), lora)


class DecoderLayer(nn.Module):
    """Pre-norm block; Gemma also norms each sublayer's output ("sandwich" norms), and its
    post_attention_layernorm is that output norm (pre_feedforward_layernorm precedes the MLP).
    OLMo 2 has only the output norms (post_attention_layernorm, post_feedforward_layernorm);
    Granite scales each sublayer's output by residual_mult before the residual add."""

    def __init__(self, config, arch: Arch, layer_idx: int):
        super().__init__()
        h, eps, unit = config.hidden_size, config.rms_norm_eps, arch.gemma
        self.gemma, self.post_norm = arch.gemma, arch.post_norm
        self.residual_mult = arch.residual_mult
        self.rope_key = arch.rope_kinds[layer_idx] or "default"
        if not arch.post_norm:
            self.input_layernorm = RMSNorm(h, eps, unit)
        self.self_attn = Attention(config, arch, layer_idx)
        self.post_attention_layernorm = RMSNorm(h, eps, unit, fp32_scale=arch.post_norm)
        if arch.gemma:
            self.pre_feedforward_layernorm = RMSNorm(h, eps, unit)
        if arch.gemma or arch.post_norm:
            self.post_feedforward_layernorm = RMSNorm(h, eps, unit, fp32_scale=arch.post_norm)
        self.mlp = MLP(config, arch)

    def forward(self, x, batch, ropes, shape):
        if self.post_norm:
            h = self.self_attn(x, batch, ropes[self.rope_key], shape)
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(x, batch.lora))
        h = self.self_attn(self.input_layernorm(x), batch, ropes[self.rope_key], shape)
        if not self.gemma:
            if self.residual_mult != 1.0:
                x = x + h * self.residual_mult
                return x + self.mlp(self.post_attention_layernorm(x), batch.lora) * self.residual_mult
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x), batch.lora)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x), batch.lora)
        return x + self.post_feedforward_layernorm(h)

    def forward_fused(self, x, residual, batch, rope, shape, rotary):
        """CUDA path: residual adds fused into the norms (x + residual is carried in
        ``residual``, updated in place), Triton attention (``rope`` None: the prefill's too)
        and silu*up.
        x: [T, H] (sublayer output; the embeddings for the first layer) -> (x, residual)."""
        h, residual, hq = _add_norm(x, residual, self.input_layernorm, self.self_attn.qkv_proj)
        if batch.prefill and rope is None:
            h = self.self_attn.prefill_fused(h, batch, rotary, shape, hq)
        elif batch.prefill:
            h = self.self_attn(h, batch, rope, shape)
        else:
            h = self.self_attn.decode_fused(h, batch, rotary, hq)
        h, residual, hq = _add_norm(h, residual, self.post_attention_layernorm,
                                    self.mlp.gate_up_proj)
        return self.mlp.forward_fused(h, batch.lora, hq), residual


def _add_norm(x, residual, norm, linear):
    """The fused residual add + RMSNorm before ``linear``: (normed, residual, the normed rows
    quantized by the same pass when ``linear`` is an fp8 one (quantization="fp8"), else None)."""
    add_rmsnorm = triton_ops()[0].add_rmsnorm
    if linear.fp8_rows():
        return add_rmsnorm(x, residual, norm.weight, norm.eps, fp8=True)
    return (*add_rmsnorm(x, residual, norm.weight, norm.eps), None)


def fused_ops_on(x: torch.Tensor) -> bool:
    """The Llama-shaped blocks run the Triton kernels (fused norms, rotary + cache write,
    paged attention, silu*up): on CUDA with Triton."""
    return x.is_cuda and triton_ops() is not None


class LlamaForCausalLM(nn.Module):
    """The decoder plus LM head; parameter names follow the HF checkpoints (fused q/k/v, gate/up)."""

    def __init__(self, config, max_len: int):
        super().__init__()
        self.arch = arch = Arch.from_config(config, max_len)  # raises for unsupported bases
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        # Gemma scales the embeddings by sqrt(hidden) (rounded to the weights' dtype)
        self.embed_scale = config.hidden_size ** 0.5 if arch.gemma else None
        # Granite multiplies the embeddings by a float (no rounding of the factor)
        self.embed_mult = arch.embedding_mult if arch.embedding_mult != 1.0 else None
        self.layers = nn.ModuleList(DecoderLayer(config, arch, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, arch.gemma,
                            fp32_scale=arch.post_norm)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tied else nn.Parameter(
            torch.empty(config.vocab_size, config.hidden_size), requires_grad=False)
        head_dim = self.layers[0].self_attn.head_dim
        self.rotaries = nn.ModuleDict({key: Rotary(config, head_dim, max_len, kind)
                                       for kind in dict.fromkeys(arch.rope_kinds)
                                       for key in [kind or "default"]})
        # longrope rotates a row by its length (short or long factors): a chunk takes its
        # prompt's (Batch.rope_top), and no prefix is shared (engine.setup)
        self.longrope = any(r.cos_long is not None for r in self.rotaries.values())
        # the global layers' tables (the runner reads their length)
        self.rotary = self.rotaries[next(k for k in ("full_attention", *self.rotaries)
                                         if k in self.rotaries)]
        # on CUDA, the Triton kernels of kernels.fused_ops / kernels.decode_attention; they
        # cover the Llama-shaped blocks (plain pre-norms, no multipliers, silu, one full-width
        # rope)
        self.use_triton_ops = (arch.llama_shaped and len(self.rotaries) == 1
                               and self.rotary.rot_dim == head_dim)
        # per GPU slot, set by engine.lora.extras.SlotExtras for adapters that have them:
        # slot -> ("full", W [V, H]) or ("lora", A [r, H], B [V, r]) replacing/adapting lm_head,
        # slot -> ("full", W [V, H]) replacing or ("lora", Aᵀ [V, r], B [H, r]) adapting the
        # input embedding (before Gemma's/Granite's scaling, as HF/PEFT). Steps that use them run
        # eagerly (engine.runner), since a slot's tensors come and go with its adapter.
        self.slot_heads: dict[int, tuple] = {}
        self.slot_embeds: dict[int, tuple] = {}

    def uses_slot_modules(self, slots) -> bool:
        """Whether any of ``slots`` has its own lm_head or embedding LoRA."""
        return bool(self.slot_heads or self.slot_embeds) and any(
            s in self.slot_heads or s in self.slot_embeds for s in slots)

    def lm_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head

    def kv_block_bytes(self, block_size: int, kv_dtype: torch.dtype | None = None) -> int:
        """Bytes one KV cache block takes over all layers (keys and values) in ``kv_dtype``
        (None: the model's dtype)."""
        item = (kv_dtype or self.embed_tokens.weight.dtype).itemsize
        return sum(2 * block_size * layer.self_attn.kv_heads * layer.self_attn.head_dim * item
                   for layer in self.layers)

    def allocate_kv_cache(self, num_blocks: int, block_size: int,
                          kv_dtype: torch.dtype | None = None) -> None:
        """Each layer's paged cache: [num_blocks * block_size, kv_heads, head_dim] x 2, in
        ``kv_dtype`` (None: the model's dtype; float8 e4m3: EngineConfig.kv_cache_dtype)."""
        p = self.embed_tokens.weight
        self.kv_dtype = kv_dtype or p.dtype
        for layer in self.layers:
            a = layer.self_attn
            shape = (num_blocks * block_size, a.kv_heads, a.head_dim)
            a.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=p.device)
            a.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=p.device)

    def forward(self, input_ids: torch.Tensor, batch: Batch,
                last_index: torch.Tensor | None) -> torch.Tensor:
        """input_ids: [B, S]; last_index: [B] position whose logits to return -> [B, V]
        (None: logits of every position -> [B, S, V])."""
        B, S = input_ids.shape
        ids = input_ids.reshape(-1)
        if batch.pad_index is not None:                                  # real tokens only
            ids = ids.index_select(0, batch.pad_index)
        if batch.decode is not None:                  # a mixed step: then the decode rows'
            ids = torch.cat([ids, batch.decode.input_ids])
        x = self.embed_tokens(ids)                                       # [T, H]
        if self.slot_embeds and batch.lora is not None and batch.lora.slot_modules:
            x = self._embed_lora(x, ids, batch.lora)
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        if self.embed_mult is not None:
            x = x * self.embed_mult
        if self.use_triton_ops and fused_ops_on(x):
            return self._forward_fused(x, batch, last_index, B, S)
        ropes = {key: self._rope(r, batch, x.dtype, last_index)
                 for key, r in self.rotaries.items()}
        for layer in self.layers:
            x = layer(x, batch, ropes, (B, S))
        if last_index is None:                                           # every position
            x, rows = self._padded(x, batch, B * S)
            rows = None if rows is None else rows.view(B, S)
            return self._logits(self.norm(x.view(B, S, -1)), rows, batch.lora)
        x, rows = self._pick(x, batch, last_index, B, S)
        return self._logits(self.norm(x), rows, batch.lora)

    @staticmethod
    def _rope(rotary, batch: Batch, dtype, last_index):
        """cos, sin tables of the step's positions (a mixed step: the prefill's and the
        decode rows')."""
        tables = rotary.tables(batch.positions, dtype, last_index, batch.rope_top)
        if batch.decode is None:
            return tables
        return tables, rotary.tables(batch.decode.positions, dtype)

    @staticmethod
    def _pick(x: torch.Tensor, batch: Batch, last_index: torch.Tensor, B: int, S: int,
              *more: torch.Tensor):
        """The hidden states [T, H] (and ``more`` like them) of each row's ``last_index``
        token, then of each decode row of a mixed step, with their LoRA slots -> ([B', H],
        slots [B'] or None, *more)."""
        slots = None if batch.lora is None else batch.lora.meta.token_slots
        if S > 1 or batch.decode is not None:
            pick = torch.arange(B, device=x.device) * S + last_index     # in the [B*S] layout
            if batch.pad_index is not None:                              # -> the packed [T]
                pick = torch.searchsorted(batch.pad_index, pick)
            if batch.decode is not None:
                rows = batch.decode.positions.shape[0]
                pick = torch.cat([pick, torch.arange(x.shape[0] - rows, x.shape[0],
                                                     device=x.device)])
            x = x.index_select(0, pick)
            slots = None if slots is None else slots.index_select(0, pick)
            more = tuple(m.index_select(0, pick) for m in more)
        return (x, slots, *more)

    def _logits(self, h: torch.Tensor, row_slots: torch.Tensor | None, lora) -> torch.Tensor:
        """h: [..., H] normed hidden states; row_slots: [...] slot of each (None: no adapter)
        -> soft-capped (Granite: divided by logits_scaling) fp32 logits [..., V], each row
        through its adapter's lm_head if any."""
        logits = F.linear(h, self.lm_weight())
        if self.slot_heads and row_slots is not None and lora.slot_modules:
            flat_h, flat = h.reshape(-1, h.shape[-1]), logits.view(-1, logits.shape[-1])
            row_slots = row_slots.reshape(-1)
            for slot, head in self.slot_heads.items():
                if slot not in lora.slots:
                    continue
                idx = torch.nonzero(row_slots == slot, as_tuple=True)[0]
                hs = flat_h.index_select(0, idx)
                if head[0] == "full":                                   # a trained lm_head
                    flat.index_copy_(0, idx, F.linear(hs, head[1].to(hs.dtype)))
                else:                                                   # LoRA on lm_head
                    flat.index_add_(0, idx, ((hs @ head[1].t().to(hs.dtype))
                                             @ head[2].t().to(hs.dtype)).to(flat.dtype))
        if self.arch.logits_scaling != 1.0:
            logits = logits / self.arch.logits_scaling                  # in the weights' dtype, as HF
        return self._softcap(logits.float())

    def _embed_lora(self, x: torch.Tensor, ids: torch.Tensor, lora) -> torch.Tensor:
        """x [T, H] += Aᵀ[token] @ Bᵀ for the tokens of slots with an embedding LoRA; x = W[token]
        for the tokens of slots with a trained embedding."""
        for slot, embed in self.slot_embeds.items():
            if slot not in lora.slots:
                continue
            idx = torch.nonzero(lora.meta.token_slots == slot, as_tuple=True)[0]
            if embed[0] == "full":
                x = x.index_copy(0, idx, F.embedding(ids.index_select(0, idx), embed[1])
                                 .to(x.dtype))
            else:
                delta = F.embedding(ids.index_select(0, idx), embed[1]) @ embed[2].t()  # [n, H]
                x = x.index_add(0, idx, delta.to(x.dtype))
        return x

    @staticmethod
    def _padded(x: torch.Tensor, batch: Batch, n: int):
        """Hidden states [T, H] and LoRA slots [T] of the real tokens back in the padded
        [B*S] layout (padding rows zero, slot -1); as they are when nothing was removed."""
        rows = None if batch.lora is None else batch.lora.meta.token_slots
        if batch.pad_index is None:
            return x, rows
        x = x.new_zeros(n, x.shape[1]).index_copy_(0, batch.pad_index, x)
        if rows is not None:
            rows = rows.new_full((n,), -1).index_copy_(0, batch.pad_index, rows)
        return x, rows

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.arch.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _forward_fused(self, x, batch, last_index, B, S):
        # decode, and prefill into the paged cache: the rotary kernel reads cos/sin at each
        # position, no per-step tables. Longrope rotates a prompt's every token by the
        # prompt's length, which the tables of a step do (as does a prefill not cached).
        rope = None
        if batch.prefill and (self.longrope or batch.rows is None or batch.slot_mapping is None
                              or not attention.PAGED_PREFILL):
            rope = self._rope(self.rotary, batch, x.dtype, last_index)
        residual = None
        for layer in self.layers:
            x, residual = layer.forward_fused(x, residual, batch, rope, (B, S), self.rotary)
        if last_index is None:                                           # every position
            x, rows = self._padded(x, batch, B * S)
            residual, _ = self._padded(residual, batch, B * S)
        else:
            x, rows, residual = self._pick(x, batch, last_index, B, S, residual)
        x, _ = triton_ops()[0].add_rmsnorm(x, residual, self.norm.weight, self.norm.eps)
        logits = self._logits(x, rows, batch.lora)                       # [B or B*S, V]
        return logits if last_index is not None else logits.view(B, S, -1)

    def lora_layers(self):
        """Yield (layer index, fused module name, LoRALinear) for every LoRA-capable layer."""
        for i, layer in enumerate(self.layers):
            yield i, "qkv_proj", layer.self_attn.qkv_proj
            yield i, "o_proj", layer.self_attn.o_proj
            yield i, "gate_up_proj", layer.mlp.gate_up_proj
            yield i, "down_proj", layer.mlp.down_proj
