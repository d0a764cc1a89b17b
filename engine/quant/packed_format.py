"""On-disk layouts of 4-bit GPTQ and AWQ checkpoints: pack, unpack and dequantize one linear.

Format facts relied on (as transformers' GPTQ/AWQ quantizers and their kernels read them):

GPTQ (quant_method "gptq", checkpoint_format "gptq", i.e. v1), per linear ``<name>.``:
  qweight int32 [in*bits/32, out]: packed along the INPUT dim; input row 8*r+k of column j
          sits in bits [4k, 4k+4) of qweight[r, j] (least significant nibble first).
  qzeros  int32 [groups, out*bits/32]: packed along the OUTPUT dim in the same nibble order;
          v1 stores (zero - 1), so the real zero point is stored + 1 (sym 4-bit: 8, stored 7).
  scales  fp16  [groups, out];  g_idx int32 [in]: the group of each input row (i // group_size
          unless desc_act reordered them);  bias fp16 [out] when the layer has one.
  W[j, i] = scales[g_idx[i], j] * (q[i, j] - zero[g_idx[i], j]).  group_size -1: one group.
AWQ (quant_method "awq", version "gemm"), per linear:
  qweight int32 [in, out*bits/32] and qzeros int32 [groups, out*bits/32], both packed along
          the OUTPUT dim with an interleaved order: nibble k of a word holds column
          AWQ_ORDER[k] of its group of 8 (so 0x75316420 packs columns with values 0..7).
          Zeros are stored as they are (no offset).  scales fp16 [groups, out].
  W[j, i] = scales[i // group_size, j] * (q[i, j] - zero[i // group_size, j]).
"""
from __future__ import annotations

import torch

BITS = 4
PER_WORD = 32 // BITS                       # 8 nibbles per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)         # nibble k holds column AWQ_ORDER[k]
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)  # [8]


def _unpack_last(words: torch.Tensor) -> torch.Tensor:
    # words: int32 [..., n] -> int32 [..., n*8], nibble k of word w at index 8w+k
    nib = (words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 0xF
    return nib.reshape(*words.shape[:-1], -1)


def _pack_last(values: torch.Tensor) -> torch.Tensor:
    # values: int [..., n*8] in [0, 15] -> int32 [..., n]
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, PER_WORD)
    word = (v << _SHIFTS.to(torch.int64).to(values.device)).sum(-1)
    return torch.where(word >= 2 ** 31, word - 2 ** 32, word).to(torch.int32)


def pack_gptq(q: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: int [in, out], zeros: int [groups, out] (real zero points) -> (qweight, qzeros)."""
    qweight = _pack_last(q.t().contiguous()).t().contiguous()      # [in/8, out]
    qzeros = _pack_last((zeros - 1) & 0xF)                         # v1 stores zero - 1
    return qweight, qzeros


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q int32 [in, out], real zero points int32 [groups, out])."""
    q = _unpack_last(qweight.t().contiguous()).t()                 # [in, out]
    zeros = (_unpack_last(qzeros) + 1) & 0xF                       # wrap as the v1 kernels do
    return q, zeros


def _awq_perm(n: int, device) -> torch.Tensor:
    # position p of the unpacked nibbles holds column perm[p]
    base = torch.tensor(AWQ_ORDER, device=device)
    return (torch.arange(0, n, PER_WORD, device=device)[:, None] + base).reshape(-1)


def pack_awq(q: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: int [in, out], zeros: int [groups, out] -> (qweight [in, out/8], qzeros [groups, out/8])."""
    perm = _awq_perm(q.shape[1], q.device)
    return _pack_last(q[:, perm]), _pack_last(zeros[:, perm])


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q int32 [in, out], zero points int32 [groups, out]) in natural column order."""
    q, z = _unpack_last(qweight), _unpack_last(qzeros)
    inv = torch.argsort(_awq_perm(q.shape[1], q.device))
    return q[:, inv], z[:, inv]


def dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
               g_idx: torch.Tensor) -> torch.Tensor:
    """Reference dequantization -> W [out, in] fp32 (q [in, out], per-group zeros/scales)."""
    g = g_idx.long()
    w = (q.float() - zeros[g].float()) * scales[g].float()         # [in, out]
    return w.t().contiguous()


def group_index(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """g_idx without act-order: row i belongs to group i // group_size (-1: one group)."""
    gs = in_features if group_size in (-1, None) else group_size
    return torch.arange(in_features, device=device, dtype=torch.int32) // gs
