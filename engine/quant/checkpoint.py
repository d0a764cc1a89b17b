"""Load a 4-bit GPTQ/AWQ checkpoint into the fused model: packed slices -> one PackedInt4Linear."""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from lorry.engine.model.llama import PACKED_MODULES
from lorry.engine.quant.packed_format import group_index, unpack_awq, unpack_gptq
from lorry.engine.quant.packed_linear import PackedInt4Linear

PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "bias")
_PACKED = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(qweight|qzeros|scales|g_idx"
                     r"|bias)$")
_FUSED_OF = {m: fused for fused, mods in PACKED_MODULES.items() for m in mods}


def read_checkpoint_method(config) -> tuple[str, dict] | None:
    """('gptq' | 'awq', quantization_config) for a pre-quantized checkpoint, else None."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method not in ("gptq", "awq"):
        raise ValueError(f"the checkpoint is pre-quantized with quant_method={method!r}, which "
                         "this engine cannot load; allowed pre-quantized checkpoints: 'gptq', "
                         "'awq' (load an unquantized checkpoint with EngineConfig.quantization="
                         "'bnb-nf4', 'bnb-int8', ... instead)")
    if qc.get("bits", 4) != 4:
        raise ValueError(f"{method} checkpoint with bits={qc.get('bits')!r}: only bits=4 is "
                         "supported")
    fmt = qc.get("checkpoint_format", "gptq") if method == "gptq" else qc.get("version", "gemm")
    if fmt not in ("gptq", "gemm"):
        raise ValueError(f"{method} checkpoint format {fmt!r} is not supported; allowed: "
                         "GPTQ checkpoint_format 'gptq', AWQ version 'gemm'")
    return method, qc


class PackedCheckpointLoader:
    """Drop-in for the loader's per-tensor assign: keeps packed tensors, builds ops at finish()."""

    def __init__(self, model, method: str, qc: dict, assign, dtype: torch.dtype):
        self.model, self.method, self.assign, self.dtype = model, method, assign, dtype
        self.group_size = qc.get("group_size", 128)
        self.parts: dict = defaultdict(dict)   # (layer, module) -> {suffix: tensor}

    def __call__(self, model, name: str, tensor: torch.Tensor) -> bool:
        m = _PACKED.match(name)
        if m is None or m[3] not in _FUSED_OF:
            return self.assign(model, name, tensor)
        self.parts[(int(m[1]), m[3])][m[4]] = tensor
        return True

    def _slice(self, layer: int, module: str, in_features: int):
        t = self.parts.get((layer, module))
        if t is None or "qweight" not in t:
            raise ValueError(f"{self.method} checkpoint lacks model.layers.{layer}.*.{module}"
                             ".qweight: every q/k/v/o/gate/up/down projection must be quantized")
        if self.method == "gptq":
            q, zeros = unpack_gptq(t["qweight"], t["qzeros"])
            g_idx = t.get("g_idx")
        else:
            q, zeros = unpack_awq(t["qweight"], t["qzeros"])
            g_idx = None
        if q.shape[0] != in_features:
            raise ValueError(f"model.layers.{layer}.{module}: packed in_features {q.shape[0]} "
                             f"does not match the model's {in_features}")
        if g_idx is None:
            g_idx = group_index(in_features, self.group_size)
        return q, zeros, t["scales"], g_idx.to(torch.int32), t.get("bias")

    def finish(self) -> None:
        """Build each fused layer's PackedInt4Linear from its slices; free the dense weights."""
        for i, fused_name, mod in self.model.lora_layers():
            slices = [self._slice(i, m, mod.in_features) for m in PACKED_MODULES[fused_name]]
            g_idx = slices[0][3]
            if any(not torch.equal(s[3], g_idx) for s in slices):
                raise ValueError(f"layer {i} {fused_name}: the fused slices have different g_idx "
                                 "(act-order per slice), which cannot share one fused op")
            device = mod.weight.device
            q = torch.cat([s[0] for s in slices], dim=1).t()                  # [out, in]
            zeros = torch.cat([s[1] for s in slices], dim=1).t()              # [out, G]
            scales = torch.cat([s[2] for s in slices], dim=1).t()             # [out, G]
            if q.shape[0] != mod.weight.shape[0]:
                raise ValueError(f"layer {i} {fused_name}: packed out_features {q.shape[0]} "
                                 f"does not match the model's {mod.weight.shape[0]}")
            bias = None
            if mod.bias is not None:
                bias = torch.cat([s[4] if s[4] is not None else torch.zeros(n) for s, n in
                                  zip(slices, mod.slice_sizes)])
            op = PackedInt4Linear(q.to(device), zeros.to(device), scales.to(device),
                                  g_idx.to(device), None if bias is None else bias.to(device),
                                  self.dtype)
            mod.base_op = op
            mod.weight, mod.bias = None, None
        self.parts.clear()
