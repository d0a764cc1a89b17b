"""Self-attention over the paged KV cache (engine.kv_cache): fused q/k/v with LoRA slices,
rope, optional q/k norms (per head, or over all heads at once), sliding windows, logit
soft-capping; prefill, chunked prefill and decode (torch), and the CUDA decode through the
Triton kernels.

Each layer's cache is ``[num_slots, kv_heads, head_dim]`` (num_slots = blocks x block size);
a step writes every token's keys/values at its ``slot_mapping`` entry and reads a sequence's
keys through its block table."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorry.engine.model.arch import Arch
from lorry.engine.model.layers import LoRALinear, LoRAStep, RMSNorm, apply_rotary

_TRITON_OPS: list = []   # [(fused_ops, decode_attention, prefill_attention)] or [None]
# prefill on CUDA through kernels.prefill_attention (False: rotary tables, torch cache
# writes, SDPA and the gather path for chunks, for comparisons: benchmarks/prefill_step.py)
PAGED_PREFILL = True


def to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in a cache's ``dtype``; float8 e4m3 saturates at +-448 (clamped first: torch
    before 2.13 turned |x| >= 480 into NaN), as kernels.paged_tiles.to_cache."""
    if dtype == torch.float8_e4m3fn:
        x = x.clamp(-448.0, 448.0)
    return x.to(dtype)


def kv_rounded(x: torch.Tensor, cache: torch.Tensor | None) -> torch.Tensor:
    """``x`` as a cache of a narrower dtype keeps it (float8: rounded, saturating at its
    largest finite value), back in x's dtype: with an fp8 cache every attention sees the keys
    and values it would read back, the first prefill's included."""
    if cache is None or cache.dtype.itemsize >= x.dtype.itemsize:
        return x
    return to_cache(x, cache.dtype).to(x.dtype)


def triton_ops():
    """(kernels.fused_ops, kernels.decode_attention, kernels.prefill_attention), imported on
    first CUDA use (None if Triton is missing: the torch code runs instead)."""
    if not _TRITON_OPS:
        try:
            from lorry.kernels import decode_attention, fused_ops, prefill_attention
            _TRITON_OPS.append((fused_ops, decode_attention, prefill_attention))
        except ImportError:
            _TRITON_OPS.append(None)
    return _TRITON_OPS[0]


def flash_decode(q: torch.Tensor) -> bool:
    """Decode attention and chunked prefill through the Triton kernels over block tables
    (CUDA with Triton), also for the bases whose other layers run the torch code."""
    return q.is_cuda and triton_ops() is not None


@dataclass
class Batch:
    """Inputs of one model step (all tensors on the model's device)."""

    positions: torch.Tensor      # [B, S] absolute positions (padding repeats the last one)
    slot_mapping: torch.Tensor | None  # [B*S] KV slot of each token (None: no cache write)
    prefill: bool
    block_tables: torch.Tensor | None = None  # [B, blocks] int32 (decode, prefill steps)
    block_size: int = 16
    kv_len: int = 0              # keys to attend through the block tables (host int)
    lora: LoRAStep | None = None
    chunked: bool = False        # prefill of chunks after cached prefixes (kv_len keys)
    # prefill without padding: the layers see only the real tokens [T]; these are their rows
    # in the padded [B*S] layout, which attention (and the cache write) still uses
    pad_index: torch.Tensor | None = None
    # a mixed step: the decode inputs of rows that decode one token each after the prefill's
    # tokens (positions [Bd, 1], their slot_mapping, block tables and kv_len, input_ids [Bd])
    decode: Batch | None = None
    input_ids: torch.Tensor | None = None   # a decode part's tokens [Bd]
    # longrope: each row's last prefill position [B] (its prompt's, for a chunk)
    rope_top: torch.Tensor | None = None
    # a prefill step's rows [3, B] int32: where each row's queries start among the real
    # tokens, how many, the position of the first (kernels.prefill_attention); the real
    # tokens' positions and KV slots [T] (the Triton rotary + cache write)
    rows: torch.Tensor | None = None
    token_positions: torch.Tensor | None = None
    token_slots: torch.Tensor | None = None


def visible(q_pos: torch.Tensor, n: int, window: int | None) -> torch.Tensor:
    """Which of keys 0..n-1 each query at ``q_pos`` [...] sees: causal, and within the last
    ``window`` positions (itself included) when windowed -> bool [..., n]."""
    keys = torch.arange(n, device=q_pos.device)
    mask = keys <= q_pos[..., None]
    if window is not None:
        mask &= keys > q_pos[..., None] - window
    return mask


class Attention(nn.Module):
    def __init__(self, config, arch: Arch, layer_idx: int):
        super().__init__()
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.window = arch.windows[layer_idx]
        self.scale, self.softcap = arch.attn_scale, arch.attn_softcap
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        slices = {"qkv_proj": q + 2 * kv} if arch.fused_checkpoint else \
            {"q_proj": q, "k_proj": kv, "v_proj": kv}
        self.qkv_proj = LoRALinear(config.hidden_size, slices, arch.qkv_bias)
        self.o_proj = LoRALinear(q, {"o_proj": config.hidden_size}, arch.o_bias)
        self.q_norm = self.k_norm = None
        self.wide_qk_norm = arch.wide_qk_norm
        if arch.qk_norm:
            # per head ([D] weights), or over all heads at once (OLMo 2: [h*D] and [kvh*D])
            qn, kn = (q, kv) if arch.wide_qk_norm else (self.head_dim, self.head_dim)
            eps, unit, fp32 = config.rms_norm_eps, arch.gemma, arch.post_norm
            self.q_norm = RMSNorm(qn, eps, unit_offset=unit, fp32_scale=fp32)
            self.k_norm = RMSNorm(kn, eps, unit_offset=unit, fp32_scale=fp32)
        self.k_cache: torch.Tensor | None = None  # [num_slots, kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def _qkv(self, qkv: torch.Tensor, batch: Batch, rope, B: int, S: int):
        """qkv: [T, (h+2kvh)*D] projections -> q [B, h, S, D], k and v [B, kvh, S, D] (q, k
        normed and rotated)."""
        h, kvh, D = self.heads, self.kv_heads, self.head_dim
        if batch.pad_index is not None:                                 # [T] -> [B*S] rows
            qkv = qkv.new_zeros(B * S, qkv.shape[1]).index_copy_(0, batch.pad_index, qkv)
        qk, v = qkv.split([(h + kvh) * D, kvh * D], dim=-1)
        if self.wide_qk_norm:                                           # before the head split
            q, k = qk.split([h * D, kvh * D], dim=-1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=-1)
        qk = qk.view(B, S, h + kvh, D).transpose(1, 2)                  # [B, h+kvh, S, D]
        if self.q_norm is not None and not self.wide_qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :h]), self.k_norm(qk[:, h:])], dim=1)
        # q and k rotated together: one set of elementwise kernels per layer
        q, k = apply_rotary(qk, *rope).split([h, kvh], dim=1)
        return q, k, v.view(B, S, kvh, D).transpose(1, 2)

    def forward(self, x: torch.Tensor, batch: Batch, rope, shape) -> torch.Tensor:
        # x: [T, H] with T = B*S (fewer when packed); rope: (cos, sin) [B, 1, S, rot_dim]
        # from Rotary.tables -- a mixed step: a pair of them, the prefill's and the decode's
        qkv = self.qkv_proj(x, batch.lora)
        d = batch.decode
        if d is None:
            out = self._attention(qkv, batch, rope, shape)
        else:   # one projection for all tokens; attention apart: prompt chunks, decode rows
            rows = d.positions.shape[0]
            T = qkv.shape[0] - rows
            out = torch.cat([self._attention(qkv[:T], batch, rope[0], shape),
                             self._attention(qkv[T:], d, rope[1], (rows, 1))])
        return self.o_proj(out, batch.lora)

    def _attention(self, qkv: torch.Tensor, batch: Batch, rope, shape) -> torch.Tensor:
        """Cache write and attention of one kind of rows: qkv [T, ...] -> [T, h*D]."""
        B, S = shape
        q, k, v = self._qkv(qkv, batch, rope, B, S)
        k, v = kv_rounded(k, self.k_cache), kv_rounded(v, self.v_cache)
        if batch.slot_mapping is not None:  # padding tokens write into the null block
            kc, vc, kvh = self.k_cache, self.v_cache, self.kv_heads
            kc[batch.slot_mapping] = to_cache(k.transpose(1, 2).reshape(B * S, kvh, -1), kc.dtype)
            vc[batch.slot_mapping] = to_cache(v.transpose(1, 2).reshape(B * S, kvh, -1), vc.dtype)
        if batch.prefill and not batch.chunked:
            mask = None
            if self.window is not None or self.softcap is not None:
                mask = visible(torch.arange(S, device=q.device), S, self.window)[None]  # [1, S, S]
            out = self._attend(q, k, v, mask)
        elif batch.prefill and PAGED_PREFILL and flash_decode(q):
            # chunks after cached keys on CUDA: each query's keys through its block table
            # (a gathered [B, kvh, kv_len] copy and a masked SDPA would run PyTorch's math
            # backend for grouped-query heads: the whole fp32 score matrix)
            out = triton_ops()[2].prefill_attention(
                q.transpose(1, 2).reshape(B * S, -1), self.k_cache, self.v_cache,
                batch.block_tables, batch.rows, S, batch.block_size, row_stride=S,
                scale=self.scale, window=self.window, softcap=self.softcap)  # [B*S, h*D]
            return out if batch.pad_index is None else out.index_select(0, batch.pad_index)
        elif not batch.prefill and flash_decode(q):
            # decode on CUDA: flash-decode through the block tables, each row's keys only
            # (no gather up to kv_len, which a captured step sets to max_model_len)
            return triton_ops()[1].decode_attention(
                q.reshape(B, -1), self.k_cache, self.v_cache, batch.block_tables,
                batch.positions.reshape(-1), batch.block_size, scale=self.scale,
                window=self.window, softcap=self.softcap)                  # [B, h*D]
        else:
            # chunks after cached prefixes, or decode: every key through the block tables
            keys, values = self._gather(batch, q.dtype)                   # [B, kvh, n, D]
            mask = visible(batch.positions, batch.kv_len, self.window)    # [B, S, n]
            # keys no query of the row sees (past a shorter row's end: its last block's tail,
            # the null block) are other sequences' stale ones; masked, but 0 x NaN is NaN
            # where a sequence whose adapter overflowed left NaN: zeroed
            unseen = ~mask.any(1)[:, None, :, None]                       # [B, 1, n, 1]
            keys, values = keys.masked_fill(unseen, 0.0), values.masked_fill(unseen, 0.0)
            if batch.prefill:
                out = self._attend(q, keys, values, mask)
            else:
                out = self._grouped(q, keys, values, mask)
        out = out.transpose(1, 2).reshape(B * S, self.heads * self.head_dim)
        if batch.pad_index is not None:
            out = out.index_select(0, batch.pad_index)
        return out

    def _gather(self, batch: Batch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of positions 0..kv_len-1 of each sequence, in ``dtype`` (the
        cache's may be narrower) -> 2 x [B, kvh, n, D]."""
        n, bs = batch.kv_len, batch.block_size
        tables = batch.block_tables[:, :-(-n // bs)].long()                    # [B, nb]
        offs = torch.arange(bs, device=tables.device)
        slots = (tables[:, :, None] * bs + offs).flatten(1)[:, :n]              # [B, n]
        return (self.k_cache[slots].to(dtype).transpose(1, 2),
                self.v_cache[slots].to(dtype).transpose(1, 2))

    def _attend(self, q, keys, values, mask):
        """q: [B, h, S, D]; keys/values: [B, kvh, n, D]; mask: [B or 1, S, n] (None: causal)."""
        if self.softcap is not None:
            return self._grouped(q, keys, values, mask)
        gqa = self.kv_heads != self.heads
        if mask is None:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True,
                                                  scale=self.scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None],
                                              scale=self.scale, enable_gqa=gqa)

    def _grouped(self, q, keys, values, mask):
        """Attention grouped by KV head, so K/V are read once and never repeated per query
        head; soft-capped logits where the base caps them. q: [B, h, S, D]; keys/values:
        [B, kvh, n, D]; mask: [B or 1, S, n] -> [B, h, S, D]."""
        B, S, g, D = q.shape[0], q.shape[2], self.heads // self.kv_heads, self.head_dim
        qg = q.reshape(B, self.kv_heads, g * S, D)                               # [B, kvh, g*S, D]
        scores = (qg @ keys.transpose(-1, -2)).float() * self.scale             # [B, kvh, g*S, n]
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.view(B, self.kv_heads, g, S, -1)
        scores = scores.masked_fill(~mask[:, None, None], float("-inf"))
        out = scores.softmax(-1).to(values.dtype).view(B, self.kv_heads, g * S, -1) @ values
        return out.reshape(B, self.heads, S, D)

    def prefill_fused(self, x: torch.Tensor, batch: Batch, rotary, shape,
                      xq=None) -> torch.Tensor:
        """CUDA prefill through Triton: q/k norms (if any), rotary of q/k in place with the
        k/v cache write, then paged prefill attention over each row's keys (its cached
        prefix and its chunk), on the step's tokens as they come (the packed real tokens, or
        the padded [B*S] ones), and flash-decode for a mixed step's decode rows.
        x: [T (+ Bd), H] -> [T (+ Bd), H]; xq: x quantized for an fp8 qkv_proj, or None."""
        fused_ops, attention, prefill = triton_ops()
        h, kvh, D = self.heads, self.kv_heads, self.head_dim
        qkv = self.qkv_proj(x, batch.lora, xq)                          # [T(+Bd), (h+2kvh)*D]
        if self.q_norm is not None:
            q = qkv[:, :h * D].view(-1, h, D)
            k = qkv[:, h * D:(h + kvh) * D].view(-1, kvh, D)
            q.copy_(self.q_norm(q))
            k.copy_(self.k_norm(k))
        d = batch.decode
        T = qkv.shape[0] - (0 if d is None else d.positions.shape[0])
        fused_ops.rotary_qk_(qkv[:T], batch.token_positions, rotary.cos, rotary.sin, h, kvh, D,
                             self.k_cache, self.v_cache, batch.token_slots)
        out = prefill.prefill_attention(
            qkv[:T, :h * D], self.k_cache, self.v_cache, batch.block_tables, batch.rows,
            shape[1], batch.block_size, row_stride=0 if batch.pad_index is not None else shape[1],
            scale=self.scale, window=self.window, softcap=self.softcap)     # [T, h*D]
        if d is not None:
            pos = d.positions.reshape(-1)
            fused_ops.rotary_qk_(qkv[T:], pos, rotary.cos, rotary.sin, h, kvh, D,
                                 self.k_cache, self.v_cache, d.slot_mapping)
            out = torch.cat([out, attention.decode_attention(
                qkv[T:, :h * D], self.k_cache, self.v_cache, d.block_tables, pos,
                d.block_size, scale=self.scale, window=self.window, softcap=self.softcap)])
        return self.o_proj(out, batch.lora)

    def decode_fused(self, x: torch.Tensor, batch: Batch, rotary, xq=None) -> torch.Tensor:
        """CUDA decode through Triton: q/k norms (if any), rotary of q/k in place with the k/v
        cache write, then flash-decode attention over each row's visible keys.
        x: [B, H] -> [B, H]; xq: x quantized for an fp8 qkv_proj, or None."""
        fused_ops, attention, _ = triton_ops()
        h, kvh, D = self.heads, self.kv_heads, self.head_dim
        pos = batch.positions.reshape(-1)                               # [B]
        qkv = self.qkv_proj(x, batch.lora, xq)                          # [B, (h+2kvh)*D]
        if self.q_norm is not None:
            q = qkv[:, :h * D].view(-1, h, D)
            k = qkv[:, h * D:(h + kvh) * D].view(-1, kvh, D)
            q.copy_(self.q_norm(q))
            k.copy_(self.k_norm(k))
        fused_ops.rotary_qk_(qkv, pos, rotary.cos, rotary.sin, h, kvh, D,
                             self.k_cache, self.v_cache, batch.slot_mapping)
        out = attention.decode_attention(qkv[:, :h * D], self.k_cache, self.v_cache,
                                         batch.block_tables, pos, batch.block_size,
                                         scale=self.scale, window=self.window,
                                         softcap=self.softcap)                     # [B, h*D]
        return self.o_proj(out, batch.lora)
