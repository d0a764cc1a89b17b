"""Pick the quantization of a load, quantize the fused base weights, report resident bytes.

Only the fused q/k/v, o, gate/up and down base weights are quantized; embeddings, norms and
the LM head stay in the model dtype, and the LoRA slots stay untouched (y = base(x) + lora(x)).
"""
from __future__ import annotations

import torch

from lorry.engine.quant.checkpoint import read_checkpoint_method
from lorry.engine.quant.onthefly import check_device, check_fp8_sizes, load_backend, tensor_bytes
from lorry.engine.quant.packed_format import group_index
from lorry.engine.quant.packed_linear import PackedInt4Linear
from lorry.engine.quant.rtn import rtn_quantize

PACKED_METHODS = ("gptq", "awq")
DUMMY_GROUP_SIZE = 128


def resolve_method(config, requested: str | None, load_format: str, device: torch.device,
                   dtype: torch.dtype) -> tuple[str | None, dict]:
    """(method, quantization_config) for this load; refuses bad combinations before loading.

    A checkpoint whose config.json has a GPTQ/AWQ ``quantization_config`` is detected; asking
    for another method on it, or for gptq/awq on an unquantized real checkpoint, is refused.
    """
    found = None if load_format == "dummy" else read_checkpoint_method(config)
    if found is not None:
        if requested not in (None, found[0]):
            raise ValueError(f"EngineConfig.quantization={requested!r} but the checkpoint is "
                             f"already quantized with {found[0]!r}; use quantization=None or "
                             f"{found[0]!r}")
        return found
    if requested in PACKED_METHODS and load_format != "dummy":
        raise ValueError(f"EngineConfig.quantization={requested!r} needs a pre-quantized "
                         f"{requested.upper()} checkpoint (config.json quantization_config."
                         f"quant_method={requested!r}); this checkpoint has none. Export one "
                         "(engine.quant.rtn.export_rtn_checkpoint) or pick an on-the-fly method: "
                         "'bnb-nf4', 'bnb-fp4', 'bnb-int8', 'torchao-int8', 'torchao-int4', "
                         "'fp8'")
    if requested is not None and requested not in PACKED_METHODS:
        check_device(requested, device, dtype)
        if requested == "fp8":
            check_fp8_sizes(config)
        load_backend(requested)          # a missing package fails here, before any loading
    return requested, {"group_size": DUMMY_GROUP_SIZE}


def base_weight_bytes(model) -> int:
    """Bytes of every base weight resident now (quantized ops counted by what they hold)."""
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if ".base_op." not in name and not name.startswith(("rotary.", "rotaries.")):
            total += tensor_bytes(t)
    return total + sum(mod.base_op.resident_bytes() for _, _, mod in model.lora_layers()
                       if getattr(mod, "base_op", None) is not None)


def _packed_from_dense(w: torch.Tensor, bias, method: str, dtype) -> PackedInt4Linear:
    q, zeros, scales = rtn_quantize(w, DUMMY_GROUP_SIZE, sym=method == "gptq")
    g_idx = group_index(w.shape[1], DUMMY_GROUP_SIZE, w.device)
    return PackedInt4Linear(q.t(), zeros.t(), scales.t(), g_idx, bias, dtype)


def quantize_model(model, method: str) -> None:
    """Replace every fused base weight of ``model`` by a ``method`` base op (in place)."""
    dtype = model.embed_tokens.weight.dtype
    build = None if method in PACKED_METHODS else load_backend(method)
    for _, _, mod in model.lora_layers():
        w = mod.weight.detach()
        b = None if mod.bias is None else mod.bias.detach()
        mod.base_op = _packed_from_dense(w, b, method, dtype) if build is None else build(w, b)
        mod.weight, mod.bias = None, None     # the dense copy is freed here
    if model.embed_tokens.weight.device.type == "cuda":
        torch.cuda.empty_cache()


def finish_load(model, method: str | None) -> None:
    """Quantize on the fly if asked, pick fast kernels, and record ``model.quant_report``."""
    before = dense_equivalent_bytes(model)
    if method is not None and not any(getattr(m, "base_op", None) is not None
                                      for _, _, m in model.lora_layers()):
        quantize_model(model, method)
    kernels = set()
    for _, _, mod in model.lora_layers():
        op = getattr(mod, "base_op", None)
        if isinstance(op, PackedInt4Linear):
            op.try_tinygemm()
        kernels.add(op.kernel if op is not None else "dense")
    model.quant_report = {"method": method, "base_weight_bytes_unquantized": before,
                          "base_weight_bytes": base_weight_bytes(model),
                          "base_kernels": sorted(kernels)}


def dense_equivalent_bytes(model) -> int:
    """Bytes the base weights would take unquantized in the model dtype (for packed loads)."""
    size = model.embed_tokens.weight.element_size()
    dense = sum(mod.in_features * sum(mod.slice_sizes) for _, _, mod in model.lora_layers())
    others = base_weight_bytes(model) - sum(
        mod.base_op.resident_bytes() if getattr(mod, "base_op", None) is not None else
        _dense_bytes_of(mod) for _, _, mod in model.lora_layers())
    return others + dense * size


def _dense_bytes_of(mod) -> int:
    return mod.weight.numel() * mod.weight.element_size() + tensor_bytes(mod.bias)
