"""Read a validated adapter's tensors into CPU memory, scaling folded into B."""
from __future__ import annotations

import copy
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lorry.engine.errors import AdapterFormatError, LoRAError
from lorry.engine.lora.extras import AdapterExtras, load_extras
from lorry.engine.lora.spec import (
    AdapterSpec,
    _named,
    _refuse_code_in_pickle,
    bin_read_limit,
    check_shapes,
)


def check_finite(spec, tensors, where: str) -> None:
    """Refuse weights holding NaN or infinity (a tensor's min and max in one pass: NaN
    propagates into both): every token of such an adapter would decode garbage, and a clear
    refusal at load says why. Checked after the conversion to the serving dtype, which may
    overflow."""
    for t in tensors:
        if t.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(t)):
            raise AdapterFormatError(f"adapter {spec.path}: its weights hold NaN or infinite "
                                     f"values ({where}); fix or retrain the adapter")


class StagedViews(Mapping):
    """(layer, module) -> (A [r, in], B*scaling [out, r]) as views into an adapter's staging
    buffers, made when asked for (the loader builds none: each would be torch calls in its
    thread)."""

    def __init__(self, spec: AdapterSpec, layout, staged: dict):
        self._spec, self._layout, self._staged = spec, layout, staged

    def __getitem__(self, key):
        _a, _b, r, _sc, _tr = self._spec.modules[key]
        layer, m = key
        f, s = self._layout.slice_of[m]
        fam, p = self._layout.families[f], self._layout.layer_pos[f][layer]
        off = fam.slice_offsets[s]
        a, b = self._staged[f]
        return a[p, s, :r], b[p, off:off + fam.slice_sizes[s], :r]

    def __iter__(self):
        return iter(self._spec.modules)

    def __len__(self) -> int:
        return len(self._spec.modules)


@dataclass
class AdapterWeights:
    """CPU tensors of one adapter: (layer, module) -> (A [r, in], B*scaling [out, r]).

    With a slot layout, ``staged`` holds {fused kind: (A, B)} staging buffers in the GPU slot
    layout (engine.lora.slot_layout) and ``tensors`` are views into them (no second copy), and
    ``extras`` the adapter's bias terms, DoRA magnitudes, lm_head and embedding LoRA.
    """

    spec: AdapterSpec
    tensors: Mapping   # a dict, or StagedViews over the staging buffers
    nbytes: int
    staged: dict | None = None
    extras: AdapterExtras | None = None


def read_adapter(lora_path: str, revision: str | None, name: str, settings: dict,
                 pin_memory: bool, layout, alloc=None,
                 roots: tuple[str, ...] | None = None) -> AdapterWeights:
    """Resolve (inside ``settings["adapter_roots"]``), validate (torch-free spec) and read one
    adapter: a load's whole work, in the engine's loader thread or in the loader process.
    ``settings``: adapter_roots, base_config, base_name, max_lora_rank, max_full_copies, dtype.
    ``roots``: the request's own roots, checked too (LoRARequest.roots). Raises LoRAError."""
    from lorry.engine.lora.resolve import resolve_adapter_dir
    from lorry.engine.lora.sources import LOCAL, check_source, pinned_files, source_kind
    from lorry.engine.lora.spec import parse_adapter

    s = settings
    if roots is not None:
        check_source(lora_path, revision=revision, roots=list(roots), reveal=False)
    path = resolve_adapter_dir(lora_path, revision=revision, roots=s["adapter_roots"])
    local = source_kind(lora_path) == LOCAL
    # the files are opened (and checked as opened) once, and read through those openings
    with pinned_files(str(path), [s["adapter_roots"], roots] if local else [],
                      under=s.get("pin_dir")) as read_from:
        spec = parse_adapter(path, s["base_config"], max_lora_rank=s["max_lora_rank"],
                             base_model=s["base_name"], read_from=read_from, scan_bin=False)
        cap = s["max_full_copies"]
        if cap is not None and spec.full_copies > cap:
            raise LoRAError(f"adapter {name!r} ({lora_path}) has {spec.full_copies} full "
                            f"module copies (modules_to_save lm_head/embed_tokens); "
                            f"max_full_module_copies={cap} (LORRY_MAX_FULL_MODULE_COPIES) "
                            "allows fewer")
        return load_adapter_weights(spec, s["base_config"], s["max_lora_rank"], s["dtype"],
                                    pin_memory, layout=layout, alloc=alloc)


def rehome(spec: AdapterSpec, layout, src: torch.Tensor, views: dict, extras: AdapterExtras,
           nbytes: int, pin_memory: bool) -> AdapterWeights:
    """AdapterWeights over a copy, in this process's own (pinned) memory, of a staging buffer
    built elsewhere (the loader process's, read here from shared memory as ``src``, 1-D):
    one copy, then the views ``{family: ((shape, stride, offset) of A, of B)}`` again. The
    head (copied on every slot write) is pinned too."""
    with layout.pin_lock:
        flat = torch.empty(src.numel(), dtype=src.dtype, pin_memory=pin_memory)
    flat.copy_(src)
    staged = {f: tuple(flat.as_strided(*v) for v in ab) for f, ab in views.items()}
    if pin_memory:
        pin_head(extras, layout)
    return AdapterWeights(spec, StagedViews(spec, layout, staged), nbytes, staged, extras)


def pin_head(extras: AdapterExtras, layout) -> None:
    """Pin the extras' head (an lm_head or its LoRA: the large part, copied on every slot
    write), under the layout's pin lock (no pinned allocation during a graph capture)."""
    if extras.head is not None:
        with layout.pin_lock:
            extras.head = (extras.head[0], *(t.pin_memory() for t in extras.head[1:]))


def load_adapter_weights(spec: AdapterSpec, base_config: dict, max_lora_rank: int,
                         dtype: torch.dtype, pin_memory: bool, layout=None,
                         alloc=None) -> AdapterWeights:
    """Load the weights file (safetensors, or .bin with ``weights_only=True``) of ``spec``.

    ``layout`` (engine.lora.slot_layout.SlotLayout): also build the staging buffers of the
    GPU slot layout, zero-padded to its rank, in one (pinned) allocation (``alloc``: made by
    ``alloc(numel, dtype)`` instead, zeroed).
    """
    path = spec.weights_file
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:  # never unpickle arbitrary objects: tensors and plain containers only
            # first its pickle alone: the shapes it declares fit the base and the file is no
            # bigger than its tensors, or nothing of it is read (a 4 GB .bin took a worker
            # to 8 GB before the shapes were checked)
            declared = _named(spec.path, path.parent, _refuse_code_in_pickle, path)
            check_shapes(copy.deepcopy(spec), {k: (None, v) for k, v in declared.shapes.items()},
                         base_config, max_lora_rank)
            limit = _named(spec.path, path.parent, bin_read_limit, path, declared)
            # then read once, at most that: the bytes scanned are the bytes loaded (the file
            # may be rewritten in place meanwhile: a compressed bomb, say)
            with open(path, "rb") as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                raise AdapterFormatError(f"adapter {spec.path}: {path.name} grew past "
                                         f"{limit} bytes while it was read")
            _named(spec.path, path.parent, _refuse_code_in_pickle, path, data)
            raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            del data
            if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
                raise ValueError("expected a dict of tensors")
            check_shapes(spec, {k: (None, tuple(v.shape)) for k, v in raw.items()},
                         base_config, max_lora_rank)
    except LoRAError:  # the adapter's own refusal (format, pickle scan), as it is
        raise
    except Exception as e:  # corrupt data, refused pickle content, I/O errors  # noqa: BLE001
        raise AdapterFormatError(f"adapter {spec.path}: cannot read {path.name}: "
                                 f"{type(e).__name__}: {e}") from None
    tensors, nbytes = {}, 0
    if layout is not None:
        extras = load_extras(spec, raw, layout)
        if pin_memory:
            pin_head(extras, layout)
        check_finite(spec, extras.tensors(), "bias, DoRA or embedding parts")
        staged = layout.stage(spec, raw, dtype, pin_memory, alloc)
        for f, ab in staged.items():
            check_finite(spec, ab, f"{f} in {dtype}")
        nbytes = sum(t.numel() * t.element_size() for ab in staged.values() for t in ab)
        tensors = StagedViews(spec, layout, staged)
        return AdapterWeights(spec, tensors, nbytes + extras.nbytes, staged, extras)
    if spec.lora_biases or spec.bias_overrides or spec.magnitudes or spec.head_weight \
            or spec.head_lora or spec.embed_lora or spec.embed_weight:
        raise ValueError(f"adapter {spec.path} has parts beyond LoRA A/B (bias terms, DoRA, "
                         "lm_head or embedding); load it with the engine's slot layout")
    for key, (a_name, b_name, _r, scaling, transposed) in spec.modules.items():
        a, b = raw[a_name].float(), raw[b_name].float()
        if transposed:
            a, b = a.t(), b.t()
        a, b = a.to(dtype).contiguous(), (b * scaling).to(dtype).contiguous()
        check_finite(spec, (a, b), f"{key[1]} of layer {key[0]}")
        if pin_memory:
            a, b = a.pin_memory(), b.pin_memory()
        tensors[key] = (a, b)
        nbytes += a.numel() * a.element_size() + b.numel() * b.element_size()
    return AdapterWeights(spec, tensors, nbytes)
