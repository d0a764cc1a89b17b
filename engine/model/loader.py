"""Build the model and fill its weights: HF safetensors (single or sharded), or random (dummy)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from lorry.engine.model.layers import RMSNorm
from lorry.engine.model.llama import LlamaForCausalLM

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp|input_layernorm|post_attention_layernorm"
                    r"|pre_feedforward_layernorm|post_feedforward_layernorm)\.?(\w*)\.?(weight|bias)?$")
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def load_hf_config(model_dir: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def _weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir} (model.safetensors or a "
                                "sharded index); .bin checkpoints are not loaded (no unpickling)")
    return files


def _assign(model: LlamaForCausalLM, name: str, tensor: torch.Tensor) -> bool:
    """Copy one checkpoint tensor into the model; False if the name is not a model weight."""
    with torch.no_grad():
        if name == "model.embed_tokens.weight":
            model.embed_tokens.weight.copy_(tensor)
        elif name == "model.norm.weight":
            model.norm.weight.copy_(tensor)
        elif name == "lm_head.weight":
            if model.lm_head is not None:
                model.lm_head.copy_(tensor)
        else:
            m = _LAYER.match(name)
            if m is None:
                return "rotary_emb" in name  # precomputed buffers in old checkpoints
            layer = model.layers[int(m[1])]
            part, module, which = m[2], m[3], m[4] or "weight"
            if part.endswith("layernorm"):
                norm = getattr(layer, part, None)
                if norm is None:
                    return False
                norm.weight.copy_(tensor)
                return True
            parent = layer.self_attn if part == "self_attn" else layer.mlp
            if module == "rotary_emb":
                return True
            if module in ("q_norm", "k_norm"):
                norm = getattr(parent, module, None)
                if norm is None:
                    return False
                norm.weight.copy_(tensor)
                return True
            fused = getattr(parent, _FUSED.get(module, module), None)
            if fused is None or module not in fused.slice_names:
                return False
            if which == "bias" and fused.bias is None:
                raise ValueError(f"checkpoint has {name} but the config declares no bias")
            fused.load_slice(module, tensor, which)
    return True


def load_model(model_dir: Path, config, *, dtype: torch.dtype, device: torch.device,
               max_len: int, load_format: str = "auto", seed: int = 0,
               quantization: str | None = None) -> LlamaForCausalLM:
    """Create the model on ``device`` in ``dtype``, fill its weights, quantize its base if asked
    (or load a GPTQ/AWQ checkpoint); ``model.quant_report`` says what is resident."""
    from lorry.engine.quant.apply import finish_load, resolve_method

    qmethod, qconfig = resolve_method(config, quantization, load_format, device, dtype)
    with torch.device(device):
        model = LlamaForCausalLM(config, max_len)
    model.to(dtype=dtype)
    model.rotaries.float()  # keep RoPE tables in fp32 like HF
    if load_format == "dummy":
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            norms = {id(m.weight): m.unit_offset for m in model.modules() if isinstance(m, RMSNorm)}
            for p in model.parameters():
                if id(p) in norms:
                    p.fill_(0.0 if norms[id(p)] else 1.0)  # Gemma norms scale by 1 + weight
                else:
                    p.normal_(0.0, 0.02, generator=gen)
        finish_load(model, qmethod)
        return model
    from safetensors import safe_open

    seen = set()
    assign = _assign
    if qmethod in ("gptq", "awq"):  # packed slices are collected, then fused at finish()
        from lorry.engine.quant.checkpoint import PackedCheckpointLoader
        assign = PackedCheckpointLoader(model, qmethod, qconfig, _assign, dtype)
    for path in _weight_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if not assign(model, name, f.get_tensor(name)):
                    raise ValueError(f"unexpected weight {name!r} in {path.name}: this "
                                     f"checkpoint does not match a {config.model_type} model")
                seen.add(name)
    if model.lm_head is not None and "lm_head.weight" not in seen:
        with torch.no_grad():  # some checkpoints omit the head though the config unties it
            model.lm_head.copy_(model.embed_tokens.weight)
    if "model.embed_tokens.weight" not in seen:
        raise ValueError(f"{model_dir}: checkpoint lacks model.embed_tokens.weight")
    if assign is not _assign:
        assign.finish()
    finish_load(model, qmethod)
    return model
