"""Base op of a GPTQ/AWQ layer: 4-bit weights with per-group scales and zeros, in plain torch.

Both checkpoint formats are converted once into one resident layout (two nibbles per byte along
the input dim). Every call dequantizes into the activation dtype and runs one matmul; on CUDA,
bf16, without act-order, the weights go instead to torch's int4 "tinygemm" kernel
(``aten._weight_int4pack_mm``), checked once against the dequantized path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TINYGEMM_GROUPS = (32, 64, 128, 256)
USE_TINYGEMM = True   # benchmarks switch it off to time the dequantize + matmul path


class PackedInt4Linear(nn.Module):
    """y = x W^T (+ b) with W[j, i] = scales[j, g(i)] * (q[j, i] - zeros[j, g(i)]).

    Parameters
    ----------
    q : int tensor [out, in] in [0, 15]
    zeros, scales : tensors [out, groups]
    g_idx : int tensor [in], the group of each input column
    bias : tensor [out] or None
    """

    def __init__(self, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        out, inp = q.shape
        self.in_features, self.out_features, self.groups = inp, out, scales.shape[1]
        self.dtype = dtype
        self.group_size = inp // self.groups
        g = g_idx.long()
        expected = torch.arange(inp, device=g.device) // self.group_size
        self.act_order = inp % self.groups != 0 or not torch.equal(g, expected)
        q8 = q.to(torch.uint8)
        self.register_buffer("qpacked", q8[:, 0::2] | (q8[:, 1::2] << 4))   # [out, in/2]
        # fp32 scales/zeros: (q - z) * s then rounds once, exactly like the reference dequant
        self.register_buffer("scales", scales.float().contiguous())           # [out, G]
        self.register_buffer("zeros", zeros.float().contiguous())             # [out, G]
        self.register_buffer("g_idx", g if self.act_order else None)
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        self.tinygemm = None   # (packed weight, scales_and_zeros) once the fast path is on
        self.kernel = "dequant"

    def dequantize(self) -> torch.Tensor:
        """W [out, in] in the activation dtype."""
        lo, hi = self.qpacked & 0xF, self.qpacked >> 4
        q = torch.stack([lo, hi], dim=-1).view(self.out_features, self.in_features).float()
        if self.g_idx is not None:
            w = (q - self.zeros[:, self.g_idx]) * self.scales[:, self.g_idx]
        else:
            q = q.view(self.out_features, self.groups, self.group_size)
            w = ((q - self.zeros[..., None]) * self.scales[..., None]).view(q.shape[0], -1)
        return w.to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in] -> [T, out]
        if self.tinygemm is not None:
            packed, sz = self.tinygemm
            y = torch.ops.aten._weight_int4pack_mm(x, packed, self.group_size, sz)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantize(), self.bias)

    def try_tinygemm(self) -> bool:
        """Switch to torch's CUDA int4 kernel when it applies and agrees with the dequant path."""
        if (not USE_TINYGEMM or self.qpacked.device.type != "cuda" or self.dtype != torch.bfloat16
                or self.act_order
                or self.group_size not in TINYGEMM_GROUPS or self.in_features % 128
                or self.out_features % 8):
            return False
        q = torch.stack([self.qpacked & 0xF, self.qpacked >> 4], -1).view(self.out_features, -1)
        try:
            # the kernel reads w = (q - 8) * scale + zero, so zero = (8 - z) * s
            packed = torch.ops.aten._convert_weight_to_int4pack(
                (q[:, 0::2] << 4 | q[:, 1::2]).contiguous(), 8)
            sz = torch.stack([self.scales.t(), ((8 - self.zeros) * self.scales).t()], dim=-1)
            sz = sz.to(torch.bfloat16).contiguous()                           # [G, out, 2]
            x = torch.randn(16, self.in_features, device=q.device, dtype=self.dtype)
            ref = F.linear(x, self.dequantize()).float()
            got = torch.ops.aten._weight_int4pack_mm(x, packed, self.group_size, sz).float()
        except (RuntimeError, AttributeError, NotImplementedError):
            return False
        if (got - ref).norm() > 2e-2 * ref.norm():
            return False
        self.tinygemm, self.kernel = (packed, sz), "tinygemm"
        empty = torch.empty(0, device=q.device)  # the dequant path's tensors are not needed now
        self.qpacked, self.scales, self.zeros = empty.to(torch.uint8), empty, empty
        return True

    def resident_bytes(self) -> int:
        tensors = [t for t in (self.qpacked, self.scales, self.zeros, self.g_idx, self.bias)
                   if t is not None]
        if self.tinygemm is not None:
            tensors += list(self.tinygemm)
        return sum(t.numel() * t.element_size() for t in tensors)
