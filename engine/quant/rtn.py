"""A tiny round-to-nearest 4-bit quantizer and an exporter to GPTQ/AWQ checkpoint layouts.

Not GPTQ or AWQ calibration: it only rounds each group to its nearest level, which is enough
to build small pre-quantized checkpoints for tests and quantized random weights for benchmarks.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from lorry.engine.quant.packed_format import group_index, pack_awq, pack_gptq

QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LINEAR = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.(\w+))\.weight$")


def rtn_quantize(w: torch.Tensor, group_size: int, sym: bool):
    """w [out, in] -> (q int32 [in, out], zeros int32 [G, out], scales fp16 [G, out]).

    sym (GPTQ's default): zero 8, scale = 2*absmax/15. asym (AWQ): scale = (max-min)/15 and
    zero = round(-min/scale). Levels are rounded with the fp16 scales that get stored, so the
    checkpoint's dequantization is exactly the reference one.
    """
    out, inp = w.shape
    gs = inp if group_size in (-1, None) else group_size
    if inp % gs:
        raise ValueError(f"in_features={inp} is not a multiple of group_size={gs}")
    g = w.float().t().reshape(inp // gs, gs, out)                     # [G, gs, out]
    if sym:
        scale = (g.abs().amax(1) * 2 / 15).clamp_min(1e-8)
        zeros = torch.full_like(scale, 8, dtype=torch.int32)
    else:
        lo, hi = g.amin(1).clamp_max(0), g.amax(1).clamp_min(0)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        zeros = torch.round(-lo / scale).clamp(0, 15).to(torch.int32)
    scale = scale.half().clamp_min(torch.finfo(torch.float16).tiny)
    q = torch.round(g / scale.float()[:, None]) + zeros[:, None]
    q = q.clamp(0, 15).to(torch.int32).reshape(inp, out)
    return q, zeros, scale


def _quantize_tensors(prefix: str, w: torch.Tensor, method: str, group_size: int) -> dict:
    q, zeros, scales = rtn_quantize(w, group_size, sym=method == "gptq")
    if method == "gptq":
        qweight, qzeros = pack_gptq(q, zeros)
        extra = {"g_idx": group_index(w.shape[1], group_size)}
    else:
        qweight, qzeros = pack_awq(q, zeros)
        extra = {}
    return {f"{prefix}.{k}": v for k, v in
            dict(qweight=qweight, qzeros=qzeros, scales=scales, **extra).items()}


def quantization_config(method: str, group_size: int) -> dict:
    """The config.json ``quantization_config`` transformers writes for these checkpoints."""
    if method == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
                "sym": True, "true_sequential": True, "checkpoint_format": "gptq"}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                "version": "gemm"}
    raise ValueError(f"method={method!r} is invalid: allowed 'gptq', 'awq'")


def export_rtn_checkpoint(src: str | Path, dst: str | Path, method: str,
                          group_size: int = 128) -> Path:
    """Write ``src`` (an fp HF Llama-family directory) to ``dst`` as a 4-bit GPTQ/AWQ checkpoint.

    q/k/v/o/gate/up/down weights are quantized; everything else (embeddings, norms, head,
    biases) is copied. Tokenizer and other small files are copied too.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lorry.engine.model.loader import _weight_files

    src, dst = Path(src), Path(dst)
    qc = quantization_config(method, group_size)
    dst.mkdir(parents=True, exist_ok=True)
    out: dict[str, torch.Tensor] = {}
    for path in _weight_files(src):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 -- safe_open is not iterable
                m = _LINEAR.match(name)
                if m and m[2] in QUANTIZED_MODULES:
                    out.update(_quantize_tensors(m[1], f.get_tensor(name), method, group_size))
                else:
                    out[name] = f.get_tensor(name)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors" and p.name != "model.safetensors.index.json":
            shutil.copy(p, dst / p.name)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst
