"""Which bases the engine serves and how they differ, read from a HF config (torch-free).

One decoder (engine.model.llama) serves every supported base; ``Arch`` holds the per-base
switches it reads: norms (pre, sandwich or post), activation, attention scale and
soft-capping, embedding/residual/logit multipliers, per-layer sliding windows and rope kinds,
fused checkpoint projections.
"""
from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text",
                   "granite", "olmo2")
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
# bases whose checkpoints (and so their LoRA adapters) hold fused qkv_proj / gate_up_proj
FUSED_CHECKPOINT_TYPES = ("phi3",)
GEMMA_TYPES = ("gemma2", "gemma3_text")
QK_NORM_TYPES = ("qwen3", "gemma3_text", "olmo2")
# bases whose q/k norms span the whole projection (all heads at once) rather than each head
WIDE_QK_NORM_TYPES = ("olmo2",)
# bases without pre-norms that norm each sublayer's output before the residual add
POST_NORM_TYPES = ("olmo2",)
_ROPE_ALIASES = {"su": "longrope", None: "default"}


def rope_parameters(config, kind: str | None = None) -> dict:
    """The rope parameters of ``config`` (of layer type ``kind`` where they differ by type,
    as Gemma 3's local and global layers), with ``rope_type`` and ``rope_theta`` filled in."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if kind is not None and isinstance(params.get(kind), dict):
        params = params[kind]
    params = dict(params)
    kind_name = params.get("rope_type", params.get("type"))
    params["rope_type"] = _ROPE_ALIASES.get(kind_name, kind_name)
    params.setdefault("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    return params


def rope_kinds(config) -> tuple[str | None, ...]:
    """Per layer, the key of its rope parameters (None: the config has one set for all)."""
    params = getattr(config, "rope_parameters", None) or {}
    types = getattr(config, "layer_types", None)
    if types and all(isinstance(params.get(t), dict) for t in set(types)):
        return tuple(types)
    return (None,) * config.num_hidden_layers


def layer_windows(config, max_len: int) -> tuple[int | None, ...]:
    """Per layer, the sliding window (keys older than it are masked), None for global layers
    and for windows that cover the whole ``max_len`` (nothing to mask)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    n = config.num_hidden_layers
    if not window or window >= max_len:
        return (None,) * n
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * n


def activation(config) -> str:
    return getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")


def check_supported(config) -> None:
    """Refuse a base this engine cannot run, naming what it supports (raises ValueError)."""
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED_TYPES:
        raise ValueError(f"model_type {mt!r} is not supported; supported bases: "
                         f"{list(SUPPORTED_TYPES)} (Llama, Mistral, Qwen2, Qwen3, Phi-3/Phi-4, "
                         "Gemma 2, Gemma 3 text, Granite, OLMo 2)")
    act = activation(config)
    if act not in ACTIVATIONS:
        raise ValueError(f"{mt}: activation {act!r} is not supported; allowed: {list(ACTIVATIONS)}")
    for kind in set(rope_kinds(config)):
        rt = rope_parameters(config, kind)["rope_type"]
        if rt not in ROPE_TYPES:
            raise ValueError(f"{mt}: rope_type {rt!r} is not supported; allowed: {list(ROPE_TYPES)}")
    types = set(getattr(config, "layer_types", None) or ())
    if types - {"sliding_attention", "full_attention"}:
        raise ValueError(f"{mt}: layer_types {sorted(types)} are not supported; allowed: "
                         "sliding_attention, full_attention")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"{mt}: use_bidirectional_attention=true is not supported (causal only)")


@dataclass(frozen=True)
class Arch:
    """The switches of one base that the shared decoder reads."""

    model_type: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    fused_checkpoint: bool          # checkpoint/adapters name qkv_proj, gate_up_proj
    qk_norm: bool                   # RMSNorm of q and k before rope
    wide_qk_norm: bool              # ... over all heads' q (k) at once, not per head (OLMo 2)
    post_norm: bool                 # no pre-norms; sublayer outputs normed (OLMo 2)
    gemma: bool                     # x * (1 + w) norms, sandwich norms, scaled embeddings
    act: str
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    windows: tuple[int | None, ...]
    rope_kinds: tuple[str | None, ...]
    # Granite: embeddings x embedding_mult, sublayer outputs x residual_mult before the
    # residual add, logits / logits_scaling (1.0: no scaling)
    embedding_mult: float = 1.0
    residual_mult: float = 1.0
    logits_scaling: float = 1.0

    @property
    def llama_shaped(self) -> bool:
        """Pre-norm blocks without multipliers: what the fused CUDA kernels cover."""
        return not (self.gemma or self.post_norm or self.residual_mult != 1.0
                    or self.embedding_mult != 1.0 or self.logits_scaling != 1.0)

    @classmethod
    def from_config(cls, config, max_len: int) -> Arch:
        check_supported(config)
        mt = config.model_type
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attn_bias = bool(getattr(config, "attention_bias", False))
        scalar = getattr(config, "query_pre_attn_scalar", None) if mt in GEMMA_TYPES else None
        scale = (scalar or head_dim) ** -0.5
        granite = {}
        if mt == "granite":
            # Granite's attention_multiplier replaces 1/sqrt(head_dim) as the score scale
            scale = float(config.attention_multiplier)
            granite = {"embedding_mult": float(config.embedding_multiplier),
                       "residual_mult": float(config.residual_multiplier),
                       "logits_scaling": float(config.logits_scaling)}
        return cls(model_type=mt, qkv_bias=attn_bias or mt == "qwen2", o_bias=attn_bias,
                   mlp_bias=bool(getattr(config, "mlp_bias", False)),
                   fused_checkpoint=mt in FUSED_CHECKPOINT_TYPES, qk_norm=mt in QK_NORM_TYPES,
                   wide_qk_norm=mt in WIDE_QK_NORM_TYPES, post_norm=mt in POST_NORM_TYPES,
                   gemma=mt in GEMMA_TYPES, act=activation(config), attn_scale=scale,
                   # Gemma 3 keeps the field in its config but does not cap attention logits
                   attn_softcap=(getattr(config, "attn_logit_softcapping", None) or None
                                 if mt == "gemma2" else None),
                   final_softcap=getattr(config, "final_logit_softcapping", None) or None,
                   windows=layer_windows(config, max_len), rope_kinds=rope_kinds(config),
                   **granite)
