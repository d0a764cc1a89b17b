"""Torch-free parsing and validation of a PEFT LoRA directory against a base config.json.

Reads adapter_config.json and the safetensors header (8-byte little-endian length + JSON)
without torch, so the API can refuse a bad adapter with the same rules as the engine.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lorry.engine.errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    BaseModelMismatchError,
    LoRAError,
    RankTooLargeError,
    UnsupportedAdapterError,
)
from lorry.engine.lora.pickle_scan import MAX_DIMS
from lorry.engine.model.arch import FUSED_CHECKPOINT_TYPES

log = logging.getLogger(__name__)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
# every base's LoRA-capable linear layers; which of them a base has comes from its config
# (BaseShapes): Phi-3's checkpoints fuse q/k/v into qkv_proj and gate/up into gate_up_proj
SUPPORTED_MODULES = ATTN + MLP
TOP_MODULES = ("embed_tokens", "lm_head")   # LoRA on the input embedding and the output head
SAFETENSORS_DTYPES = {"F32", "F16", "BF16"}
PEFT_DEFAULT_ALPHA = 8  # LoraConfig.lora_alpha when adapter_config.json leaves it out
# init_lora_weights that change the base weights when the adapter is created: saved as they
# are, the adapter fits only that changed base ("pissa_niter_4" counts as "pissa").
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
# a tensor name, without PEFT's "base_model.model." prefix and ".default" adapter segments
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(.+)$")
_PREFIX = re.compile(r"^base_model\.model\.")
_DEFAULT = re.compile(r"\.default(?=\.|$)")
# what a linear module's tensors are: LoRA A/B, lora_bias (lora_B.bias), DoRA's magnitude,
# a saved base bias (bias="all"/"lora_only": it replaces the base's bias for this adapter)
_LAYER_PARTS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_B.bias": "lora_bias",
                "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
                "base_layer.bias": "bias", "bias": "bias"}
# model-level modules: a LoRA on lm_head or embed_tokens, a trained lm_head or embed_tokens
# (modules_to_save),
# and the copies of the base weights PEFT saves next to an embedding/lm_head LoRA
_TOP_PARTS = {"lm_head.lora_A.weight": ("head", "A"), "lm_head.lora_B.weight": ("head", "B"),
              "lm_head.weight": ("head", "full"), "lm_head.base_layer.weight": ("copy", "lm_head"),
              "model.embed_tokens.weight": ("embed", "full"),
              "model.embed_tokens.lora_embedding_A": ("embed", "A"),
              "model.embed_tokens.lora_embedding_B": ("embed", "B"),
              "model.embed_tokens.base_layer.weight": ("copy", "embed_tokens")}
BIAS_MODES = ("none", "all", "lora_only")
MODULES_TO_SAVE = ("lm_head", "embed_tokens")


@dataclass(frozen=True)
class BaseShapes:
    """Linear-layer dimensions of a supported base, from its config.json."""

    model_type: str
    num_layers: int
    dims: dict  # module -> (in_features, out_features)
    hidden: int = 0
    vocab: int = 0
    biased: frozenset = frozenset()  # modules whose base layers have a bias
    tied: bool = False  # tie_word_embeddings: lm_head is the input embedding

    @classmethod
    def from_config(cls, cfg: dict) -> BaseShapes:
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or h // heads
        kv = cfg.get("num_key_value_heads") or heads
        i = cfg["intermediate_size"]
        model_type = cfg.get("model_type", "llama")
        if model_type in FUSED_CHECKPOINT_TYPES:
            dims = {"qkv_proj": (h, (heads + 2 * kv) * head_dim), "o_proj": (heads * head_dim, h),
                    "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        else:
            dims = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim),
                    "v_proj": (h, kv * head_dim), "o_proj": (heads * head_dim, h),
                    "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        biased = set()
        if cfg.get("attention_bias") or model_type == "qwen2":
            biased |= {"q_proj", "k_proj", "v_proj"}
        if cfg.get("attention_bias"):
            biased.add("o_proj")
        if cfg.get("mlp_bias"):
            biased |= {"gate_proj", "up_proj", "down_proj"}
        return cls(model_type, cfg["num_hidden_layers"], dims, h, cfg.get("vocab_size", 0),
                   frozenset(biased & set(dims)), bool(cfg.get("tie_word_embeddings", False)))


@dataclass
class AdapterSpec:
    """A validated adapter: which (layer, module) pairs it changes, ranks and scalings."""

    path: Path
    weights_file: Path
    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    base_model_name_or_path: str | None
    config: dict = field(default_factory=dict, repr=False)
    max_rank: int = 0
    # (layer, module) -> (A tensor name, B tensor name, rank, scaling, transposed)
    modules: dict = field(default_factory=dict)
    # (layer, module) -> tensor name: lora_B.bias (added x scaling), a saved base bias (it
    # replaces the base's bias for this adapter's rows), DoRA's magnitude vector
    lora_biases: dict = field(default_factory=dict)
    bias_overrides: dict = field(default_factory=dict)
    magnitudes: dict = field(default_factory=dict)
    head_weight: str | None = None   # modules_to_save lm_head: [vocab, hidden], replaces lm_head
    head_lora: tuple | None = None   # LoRA on lm_head: (A, B, rank, scaling, transposed)
    embed_lora: tuple | None = None  # LoRA on embed_tokens: (A [r, vocab], B [hidden, r], rank, scaling)
    embed_weight: str | None = None  # modules_to_save embed_tokens: [vocab, hidden], replaces it
    # "lm_head"/"embed_tokens" -> tensor name of the base weight PEFT saves with their LoRA
    base_copies: dict = field(default_factory=dict)

    @property
    def use_dora(self) -> bool:
        return bool(self.magnitudes)

    @property
    def full_copies(self) -> int:
        """Full per-adapter matrices (trained lm_head / embed_tokens) a GPU slot holds for it."""
        return (self.head_weight is not None) + (self.embed_weight is not None)

    @property
    def target_modules(self) -> list[str]:
        return sorted({m for _, m in self.modules})


MAX_CONFIG_BYTES = 1024 * 1024  # adapter_config.json (PEFT writes about 1 KB)
# A safetensors header (the format's own limit is 100 MB): an adapter's names and shapes take
# ~100 bytes a tensor, ~200 KB for every module of a 126-layer base, and parsing 95 MB of
# them held an API thread 9.6 s and 1.1 GB (a hostile-tenant audit)
MAX_HEADER_BYTES = 16 * 1024 * 1024
# rank_pattern / alpha_pattern keys: every module name is matched against every key, so 78k
# keys took 26 s of a thread; per-layer patterns of an 80-layer base take ~600
MAX_PATTERN_KEYS = 2048

def read_safetensors_header(path: Path) -> dict:
    """Return {tensor name: {"dtype", "shape", "data_offsets"}} of a safetensors file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            if n > MAX_HEADER_BYTES:
                raise ValueError(f"header of {n} bytes: an adapter's takes well under "
                                 f"{MAX_HEADER_BYTES} (names and shapes of its tensors)")
            header = json.loads(f.read(n))
    except RecursionError:
        raise AdapterFormatError(f"corrupt safetensors file {path}: its header is nested too "
                                 "deeply") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"corrupt safetensors file {path}: {e}") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"corrupt safetensors file {path}: its header is not a JSON "
                                 "object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and _int_list(info.get("shape")) and _int_list(info.get("data_offsets"))
                and len(info["data_offsets"]) == 2 and len(info["shape"]) <= MAX_DIMS):
            raise AdapterFormatError(f"corrupt safetensors file {path}: tensor {name!r} has no "
                                     "dtype, shape (at most 4 dimensions) and data_offsets of "
                                     "the format's types")
        start, end = info["data_offsets"]
        if not 0 <= start <= end <= size - 8 - n:
            raise AdapterFormatError(f"corrupt safetensors file {path}: tensor {name!r} "
                                     f"lies outside the file (truncated?)")
        itemsize = _DTYPE_BYTES.get(info["dtype"])
        if itemsize is not None and end - start != math.prod(info["shape"]) * itemsize:
            raise AdapterFormatError(f"corrupt safetensors file {path}: tensor {name!r} "
                                     f"holds {end - start} bytes, its {info['dtype']} shape "
                                     f"{info['shape']} needs {math.prod(info['shape']) * itemsize}")
    return header


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1}


def _int_list(value) -> bool:
    """Non-negative ints the format's u64 holds."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**64 for v in value)


def _check_field_types(cfg: dict, path: Path) -> None:
    """Refuse adapter_config.json fields of the wrong JSON type (PEFT writes these types), so
    that what reads them later cannot fail with anything but a LoRAError."""
    def refuse(key: str, wanted: str):
        raise AdapterFormatError(f"adapter {path}: adapter_config.json {key}={cfg[key]!r:.200} "
                                 f"must be {wanted}")

    def number(v) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return False
        try:
            return math.isfinite(v)
        except OverflowError:   # an int past float's range (10**400 in the JSON)
            return False

    for key in ("target_modules", "modules_to_save"):  # PEFT: a regex or names; names
        v = cfg.get(key)
        if v is not None and not (isinstance(v, str) and key == "target_modules") and not (
                isinstance(v, list) and all(isinstance(m, str) for m in v)):
            refuse(key, "a list of module names" + (" or a pattern" if key == "target_modules"
                                                    else ""))
    if "lora_alpha" in cfg and not number(cfg["lora_alpha"]):
        refuse("lora_alpha", "a number")
    for key in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(key)
        if v is None:
            continue
        if not isinstance(v, dict):
            refuse(key, "an object of module-name patterns")
        if len(v) > MAX_PATTERN_KEYS:
            raise AdapterFormatError(f"adapter {path}: adapter_config.json {key} has {len(v)} "
                                     f"keys; at most {MAX_PATTERN_KEYS} are read")
        for pattern, value in v.items():
            if not (number(value) and (key == "alpha_pattern" or isinstance(value, int))):
                refuse(key, "an object of module-name patterns to " + (
                    "ranks (ints)" if key == "rank_pattern" else "numbers"))
            problem = _pattern_problem(pattern)
            if problem:
                raise AdapterFormatError(f"adapter {path}: adapter_config.json {key} key "
                                         f"{pattern!r:.200} {problem}")
    for key in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):  # "false" is true
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            refuse(key, "true or false")
    for key in ("bias", "init_lora_weights", "peft_type"):
        v = cfg.get(key)
        if v is not None and not isinstance(v, (str, bool)):
            refuse(key, "a string" if key != "init_lora_weights" else "a bool or a string")


# A rank_pattern / alpha_pattern key, in the subset of regular expressions this engine runs:
# characters of module names, ".", "|", "^", "$", groups, classes like [0-9], escapes \. \d
# \w, and at most MAX_PATTERN_QUANTIFIERS of * + ? each after one character (never after a
# group). Whole module names and PEFT's own patterns fit; a nested quantifier ("(.|.)*z")
# would backtrack for minutes over one module name, on the thread that validates it.
_PATTERN_TOKEN = re.compile(r"\\[.dw_-]|\[\^?[A-Za-z0-9_-]+\]|[A-Za-z0-9_.|^$()-]|[*+?]")
MAX_PATTERN_CHARS, MAX_PATTERN_QUANTIFIERS = 256, 3


def _pattern_problem(key: str) -> str | None:
    """Why a rank_pattern/alpha_pattern key is refused, or None."""
    if not 0 < len(key) <= MAX_PATTERN_CHARS:
        return f"must have 1 to {MAX_PATTERN_CHARS} characters"
    pos, prev, quantifiers = 0, None, 0
    while pos < len(key):
        m = _PATTERN_TOKEN.match(key, pos)
        if m is None:
            return (f"has {key[pos]!r} at {pos}: allowed are module-name characters, . | ^ $, "
                    "groups, classes like [0-9], the escapes \\. \\d \\w and * + ? after a "
                    "character")
        token = m.group()
        if token in "*+?":
            quantifiers += 1
            if prev is None or prev in ("(", ")", "|", "^", "*", "+", "?"):
                return f"has {token!r} at {pos} after no single character (nested repetition)"
        prev, pos = token, m.end()
    if quantifiers > MAX_PATTERN_QUANTIFIERS:
        return f"has more than {MAX_PATTERN_QUANTIFIERS} of * + ?"
    try:
        re.compile(rf"(.*\.)?({key})$")        # as _pattern_value runs it
    except re.error as e:
        return f"is not a regular expression: {e}"
    return None


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key, in the saved order, that is a
    regex matching the end of the module name after a dot (``(.*\\.)?(key)$``), so that
    alternations (``"gate_proj|up_proj"``) and overlapping keys resolve as PEFT resolves them."""
    for key, value in pattern.items():
        if _pattern_regex(key).match(name):
            return value
    return default


@functools.lru_cache(maxsize=2 * MAX_PATTERN_KEYS)
def _pattern_regex(key: str) -> re.Pattern:
    return re.compile(rf"(.*\.)?({key})$")


def _check_config(cfg: dict, path: Path) -> None:
    """Refuse PEFT features the engine does not serve."""
    _check_field_types(cfg, path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapterError(f"adapter {path}: peft_type={cfg.get('peft_type')!r} "
                                      "is not supported; only LORA adapters are")
    if cfg.get("use_dora") and cfg.get("lora_bias"):
        raise UnsupportedAdapterError(f"adapter {path}: DoRA (use_dora=true) with lora_bias=true "
                                      "is not supported (PEFT refuses it too); use one of them")
    if cfg.get("bias", "none") not in BIAS_MODES:
        raise UnsupportedAdapterError(f"adapter {path}: bias={cfg.get('bias')!r} is not supported;"
                                      f" allowed: {list(BIAS_MODES)}")
    extra = [m for m in cfg.get("modules_to_save") or [] if m not in MODULES_TO_SAVE]
    if extra:
        raise UnsupportedAdapterError(
            f"adapter {path}: modules_to_save={cfg['modules_to_save']!r} is not supported for "
            f"{extra}; allowed: {list(MODULES_TO_SAVE)} (a full trained lm_head / input "
            "embedding)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.split("_")[0] in BASE_CHANGING_INITS:
        raise UnsupportedAdapterError(
            f"adapter {path}: init_lora_weights={init!r} was saved without conversion: its "
            "weights only fit a base model that the initialization changed; save it again with "
            "PEFT's path_initial_model_for_weight_conversion (a plain LoRA) to serve it here")
    if cfg.get("alora_invocation_tokens"):
        raise UnsupportedAdapterError(
            f"adapter {path}: an activated LoRA (alora_invocation_tokens) applies only after its "
            "invocation tokens; it is not supported here, and serving it as a plain LoRA would "
            "give other outputs")
    for key in ("layer_replication", "target_parameters", "trainable_token_indices"):
        if cfg.get(key):
            raise UnsupportedAdapterError(f"adapter {path}: {key}={cfg[key]!r} is not supported")
    tm = cfg.get("target_modules")
    names = [tm] if isinstance(tm, str) else list(tm or [])
    for name in names:
        leaf = name.rsplit(".", 1)[-1]
        if not isinstance(tm, str) and leaf not in SUPPORTED_MODULES + TOP_MODULES:
            raise BaseModelMismatchError(
                f"adapter {path}: target module {name!r} does not exist in any supported base; "
                f"allowed: {list(SUPPORTED_MODULES + TOP_MODULES)}")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterFormatError(f"adapter {path}: r={r!r} must be a positive int")


def _named(path: Path, files: Path, check, *args):
    """check(*args), its refusal naming the adapter's directory, not where its files are read
    from (``read_from``: a private folder of links to the opened files)."""
    try:
        return check(*args)
    except LoRAError as e:
        if files == path:
            raise
        raise type(e)(str(e).replace(str(files), str(path))) from None


def parse_adapter(path: str | Path, base_config: dict, *, max_lora_rank: int | None = None,
                  base_model: str | None = None,
                  read_from: str | Path | None = None, scan_bin: bool = True) -> AdapterSpec:
    """Parse and validate a PEFT LoRA directory against ``base_config`` (a config.json dict).

    ``read_from``: where its files are read (``sources.pinned_files``); ``path`` then only
    names the adapter in messages. ``scan_bin=False``: a caller that loads a .bin scans the
    bytes it loads itself (``load_adapter_weights``), so it is not scanned twice. Raises a subclass of ``engine.errors.LoRAError`` naming the
    problem. Reads no tensor data.
    """
    path = Path(path)
    files = Path(read_from) if read_from is not None else path
    cfg_file = files / "adapter_config.json"
    try:
        found = cfg_file.is_file()
        size = cfg_file.stat().st_size if found else 0
    except OSError as e:  # e.g. a path component longer than the filesystem allows
        raise AdapterNotFoundError(f"adapter {str(path)[:200]}: cannot be read "
                                   f"({e.strerror or e})") from None
    if not found:
        raise AdapterNotFoundError(f"adapter {path}: adapter_config.json not found")
    if size > MAX_CONFIG_BYTES:  # read whole below: a sparse 20 GB file would be 20 GB here
        raise AdapterFormatError(f"adapter {path}: adapter_config.json is {size} bytes, "
                                 f"more than the {MAX_CONFIG_BYTES} a PEFT config needs")
    try:
        cfg = json.loads(cfg_file.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")  # noqa: TRY004
    except RecursionError:
        raise AdapterFormatError(f"adapter {path}: adapter_config.json is nested too "
                                 "deeply") from None
    except (OSError, ValueError) as e:
        raise AdapterFormatError(f"adapter {path}: adapter_config.json is unreadable: {e}") from None
    _check_config(cfg, path)
    st, bin_ = files / "adapter_model.safetensors", files / "adapter_model.bin"
    if st.is_file():
        header = _named(path, files, read_safetensors_header, st)
        shapes = {k: (v.get("dtype"), tuple(v.get("shape", ()))) for k, v in header.items()}
        weights = st
    elif bin_.is_file():
        shapes, weights = None, bin_  # a loader scans what it loads (load_adapter_weights)
        if scan_bin:   # the shapes its pickle declares, checked before any tensor is read
            found = _named(path, files, _refuse_code_in_pickle, bin_)
            _named(path, files, bin_read_limit, bin_, found)
            shapes = {k: (None, v) for k, v in found.shapes.items()}
    else:
        raise AdapterNotFoundError(f"adapter {path}: neither adapter_model.safetensors nor "
                                   "adapter_model.bin found")
    spec = AdapterSpec(path=path, weights_file=weights, r=cfg["r"],
                       lora_alpha=float(cfg.get("lora_alpha", PEFT_DEFAULT_ALPHA)),
                       use_rslora=bool(cfg.get("use_rslora", False)),
                       fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
                       base_model_name_or_path=cfg.get("base_model_name_or_path"), config=cfg)
    if base_model and spec.base_model_name_or_path and spec.base_model_name_or_path != base_model:
        log.warning("adapter %s was trained on %r, the engine serves %r; shapes are checked",
                    path, spec.base_model_name_or_path, base_model)
    if shapes is not None:
        check_shapes(spec, shapes, base_config, max_lora_rank)
    return spec


def bin_read_limit(path: Path, found) -> int:
    """The most bytes a .bin whose pickle was scanned (``found``, a ScanResult) may take:
    its tensors twice over (a storage may hold more than its view) and 4 MiB for the
    archive's pickle and layout. A bigger file is refused before it is read: a 4 GB .bin
    (or a valid one swapped for a 3 GiB file) took a worker to 8 GB before the shape check
    refused it (a hostile-tenant audit)."""
    limit = 2 * found.tensor_bytes + (4 << 20)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise AdapterFormatError(f"adapter {path.parent}: {path.name} is unreadable: {e}") \
            from None
    if size > limit:
        raise AdapterFormatError(f"adapter {path.parent}: {path.name} is {size} bytes, but "
                                 f"the tensors its pickle names take {found.tensor_bytes}: "
                                 "save each tensor on its own (torch.save({k: v.clone() "
                                 "for k, v in state_dict.items()}): a view saves its whole "
                                 "storage) or convert the adapter to "
                                 "adapter_model.safetensors")
    return limit


def _refuse_code_in_pickle(path: Path, data: bytes | None = None):
    """Refuse a .bin that torch.load(weights_only=True) would refuse (never unpickled);
    ``data``: its bytes as read once, scanned instead of the file (then loaded as such).
    Returns the scan (its ``shapes`` and ``tensor_bytes``)."""
    from lorry.engine.lora.pickle_scan import scan_checkpoint

    try:
        found = scan_checkpoint(path if data is None else data)
    except OSError as e:
        raise AdapterFormatError(f"adapter {path.parent}: {path.name} is unreadable: {e}") from None
    if found.imports:
        raise UnsupportedAdapterError(
            f"adapter {path.parent}: {path.name} is a pickle that imports "
            f"{', '.join(sorted(set(found.imports))[:5])}; only tensors are allowed (convert the "
            "adapter to adapter_model.safetensors)")
    if found.problems:
        raise UnsupportedAdapterError(
            f"adapter {path.parent}: {path.name} is not a weights-only torch checkpoint of "
            f"tensors: {found.describe(3)}; save it with torch.save(state_dict) or convert it "
            "to adapter_model.safetensors")
    return found


def check_shapes(spec: AdapterSpec, shapes: dict, base_config: dict,
                 max_lora_rank: int | None) -> None:
    """Fill ``spec`` from {tensor name: (dtype, shape)}; refuse any mismatch."""
    base = BaseShapes.from_config(base_config)
    path, found, top = spec.path, {}, {}
    for name, (dtype, shape) in shapes.items():
        if dtype is not None and dtype not in SAFETENSORS_DTYPES:
            raise AdapterFormatError(f"adapter {path}: tensor {name!r} has dtype {dtype}; "
                                     f"allowed {sorted(SAFETENSORS_DTYPES)}")
        key = _DEFAULT.sub("", _PREFIX.sub("", name))
        if key in _TOP_PARTS:
            top[_TOP_PARTS[key]] = (name, tuple(shape))
            continue
        m = _LAYER_KEY.match(key)
        part = _LAYER_PARTS.get(m[3]) if m else None
        if part is None and m is None and ("lm_head" in key or "embed_tokens" in key):
            raise UnsupportedAdapterError(
                f"adapter {path}: tensor {name!r} is not supported: embed_tokens and lm_head "
                "take a plain LoRA (no DoRA, no lora_bias) or modules_to_save")
        if part is None:
            raise UnsupportedAdapterError(
                f"adapter {path}: unexpected tensor {name!r}; served are LoRA A/B (with lora_bias"
                f", DoRA magnitudes and saved biases) of {list(SUPPORTED_MODULES)}, LoRA on "
                "embed_tokens/lm_head and a modules_to_save lm_head/embed_tokens")
        layer, module = int(m[1]), m[2]
        if module not in base.dims:
            raise BaseModelMismatchError(f"adapter {path}: target module {module!r} does not exist "
                                         f"in the base ({base.model_type}); it has {list(base.dims)}")
        if layer >= base.num_layers:
            raise BaseModelMismatchError(f"adapter {path}: layer {layer} does not exist; the base "
                                         f"has {base.num_layers} layers")
        found.setdefault((layer, module), {})[part] = (name, tuple(shape))
    if not found and not top:
        raise AdapterFormatError(f"adapter {path}: the weights file has no LoRA tensors")
    for (layer, module), parts in sorted(found.items()):
        _check_layer_module(spec, base, layer, module, parts, max_lora_rank)
    _check_top_modules(spec, base, top, max_lora_rank)
    if spec.config.get("use_dora") and set(spec.magnitudes) != set(spec.modules):
        raise AdapterFormatError(f"adapter {path}: use_dora=true but the DoRA magnitude vectors "
                                 "of some LoRA modules are missing")
    if spec.magnitudes and not spec.config.get("use_dora"):
        raise AdapterFormatError(f"adapter {path}: DoRA magnitude vectors without use_dora=true")


def _lora_pair(spec: AdapterSpec, what: str, full: str, a_shape: tuple, b_shape: tuple,
               fan_in: int, fan_out: int, max_lora_rank: int | None) -> tuple:
    """(rank, scaling, transposed) of a LoRA A/B pair over ``fan_in -> fan_out``; refuses a
    pair that does not fit the base or exceeds ``max_lora_rank``."""
    pattern_r = spec.config.get("rank_pattern") or {}
    pattern_a = spec.config.get("alpha_pattern") or {}
    r_cfg = int(_pattern_value(pattern_r, full, spec.r))
    if r_cfg <= 0:
        raise AdapterFormatError(f"adapter {spec.path}: {what} has rank {r_cfg} "
                                 "(adapter_config.json r or rank_pattern); ranks must be positive")
    if a_shape == (r_cfg, fan_in) and b_shape == (fan_out, r_cfg):
        transposed = False
    elif spec.fan_in_fan_out and a_shape == (fan_in, r_cfg) and b_shape == (r_cfg, fan_out):
        transposed = True
    else:
        raise BaseModelMismatchError(
            f"adapter {spec.path}: {what}: lora_A {list(a_shape)} / lora_B {list(b_shape)} do not "
            f"fit the base ({what} is {fan_in} -> {fan_out}, rank {r_cfg}); expected A "
            f"[{r_cfg}, {fan_in}] and B [{fan_out}, {r_cfg}]")
    if max_lora_rank is not None and r_cfg > max_lora_rank:
        raise RankTooLargeError(f"adapter {spec.path}: rank {r_cfg} ({what}) exceeds "
                                f"max_lora_rank={max_lora_rank}; raise max_lora_rank or use a "
                                "smaller adapter")
    alpha = float(_pattern_value(pattern_a, full, spec.lora_alpha))
    scaling = alpha / math.sqrt(r_cfg) if spec.use_rslora else alpha / r_cfg
    spec.max_rank = max(spec.max_rank, r_cfg)
    return r_cfg, scaling, transposed


def _check_layer_module(spec: AdapterSpec, base: BaseShapes, layer: int, module: str,
                        parts: dict, max_lora_rank: int | None) -> None:
    """Record one (layer, module)'s LoRA pair, lora_bias, DoRA magnitude and saved bias."""
    path, (fan_in, fan_out) = spec.path, base.dims[module]
    what = f"layer {layer} {module}"
    for part, (name, shape) in parts.items():
        if part in ("lora_bias", "magnitude", "bias") and shape != (fan_out,):
            raise BaseModelMismatchError(f"adapter {path}: tensor {name!r} has shape "
                                         f"{list(shape)}; {module} needs [{fan_out}]")
    if "bias" in parts:
        if module not in base.biased:
            raise BaseModelMismatchError(
                f"adapter {path}: {what} has a saved bias ({parts['bias'][0]!r}) but the base's "
                f"{module} has none (biased modules: {sorted(base.biased)})")
        spec.bias_overrides[(layer, module)] = parts["bias"][0]
    lora = {p for p in parts if p != "bias"}
    if not lora:
        return
    if not {"A", "B"} <= lora:
        raise AdapterFormatError(f"adapter {path}: {what} lacks lora_"
                                 f"{'B' if 'A' in lora else 'A'}")
    (a_name, a_shape), (b_name, b_shape) = parts["A"], parts["B"]
    full = f"model.layers.{layer}.{'self_attn' if module in ATTN else 'mlp'}.{module}"
    r, scaling, transposed = _lora_pair(spec, what, full, a_shape, b_shape, fan_in, fan_out,
                                        max_lora_rank)
    spec.modules[(layer, module)] = (a_name, b_name, r, scaling, transposed)
    if "lora_bias" in parts:
        spec.lora_biases[(layer, module)] = parts["lora_bias"][0]
    if "magnitude" in parts:
        spec.magnitudes[(layer, module)] = parts["magnitude"][0]


def _full_copy(path: Path, top: dict, part: str, module: str, vocab: int, hidden: int) -> str:
    """The tensor name of a trained ``module`` (modules_to_save), checked: [vocab, hidden], and
    not together with a LoRA on the same module."""
    name, shape = top[(part, "full")]
    if shape != (vocab, hidden):
        raise BaseModelMismatchError(f"adapter {path}: the trained {module} {name!r} has shape "
                                     f"{list(shape)}; the base needs [{vocab}, {hidden}]")
    if (part, "A") in top or (part, "B") in top:
        raise UnsupportedAdapterError(f"adapter {path}: both a trained {module} "
                                      f"(modules_to_save) and a LoRA on {module}")
    return name


def _check_top_modules(spec: AdapterSpec, base: BaseShapes, top: dict,
                       max_lora_rank: int | None) -> None:
    """Record a LoRA on lm_head / embed_tokens, a trained lm_head / embed_tokens, and the base
    copies."""
    path, h, v = spec.path, base.hidden, base.vocab
    for (kind, part), (name, shape) in top.items():
        if kind == "copy" and shape != (v, h):
            raise BaseModelMismatchError(
                f"adapter {path}: tensor {name!r} has shape {list(shape)}, the base's {part} is "
                f"[{v}, {h}] (an adapter for a resized vocabulary is not supported)")
        if kind == "copy":
            spec.base_copies[part] = name
    if ("head", "full") in top:
        spec.head_weight = _full_copy(path, top, "head", "lm_head", v, h)
    if ("head", "A") in top or ("head", "B") in top:
        if not {("head", "A"), ("head", "B")} <= set(top):
            raise AdapterFormatError(f"adapter {path}: lm_head lacks lora_A or lora_B")
        (a, a_shape), (b, b_shape) = top[("head", "A")], top[("head", "B")]
        r, scaling, transposed = _lora_pair(spec, "lm_head", "lm_head", a_shape, b_shape, h, v,
                                            max_lora_rank)
        spec.head_lora = (a, b, r, scaling, transposed)
    if ("embed", "full") in top:
        name = _full_copy(path, top, "embed", "embed_tokens", v, h)
        if spec.config.get("ensure_weight_tying") and base.tied:
            raise UnsupportedAdapterError(
                f"adapter {path}: a trained embed_tokens with ensure_weight_tying=true on a base "
                "with tied embeddings (it would replace the lm_head too) is not supported")
        spec.embed_weight = name
    if ("embed", "A") in top or ("embed", "B") in top:
        if not {("embed", "A"), ("embed", "B")} <= set(top):
            raise AdapterFormatError(f"adapter {path}: embed_tokens lacks lora_embedding_A or _B")
        (a, a_shape), (b, b_shape) = top[("embed", "A")], top[("embed", "B")]
        # PEFT's embedding LoRA: A [r, vocab] (looked up by token), B [hidden, r]
        r, scaling, _ = _lora_pair(spec, "embed_tokens", "model.embed_tokens",
                                   a_shape, b_shape, v, h, max_lora_rank)
        spec.embed_lora = (a, b, r, scaling)


def read_base_config(model_dir: str | Path) -> dict:
    """Load a base model's config.json (a dict)."""
    p = Path(model_dir) / "config.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"base model config {p} is unreadable: {e}") from None
