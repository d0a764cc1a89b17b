"""What an adapter adds beyond LoRA A/B: per-slot output shifts and DoRA scales of the linear
layers, a trained or LoRA-adapted lm_head, a trained or LoRA-adapted input embedding.

A linear layer's output for the rows of slot s becomes ``y * scale[s] + shift[s]`` where
``shift`` holds the adapter's bias terms (lora_B.bias x scaling, a saved base bias minus the
base's) and ``scale`` DoRA's magnitude / ||W + scaling·BA|| per output row (the norm is computed
on the device when the adapter is written into its slot). Those buffers exist only for the
module kinds some adapter needs them for. Heads and embedding LoRAs are kept per slot, only for
the adapters that have one, on the model (``slot_heads``, ``slot_embeds``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorry.engine.errors import BaseModelMismatchError, UnsupportedAdapterError
from lorry.engine.lora.spec import AdapterSpec

# rows of W + scaling·BA whose norms are computed at once (bounds the temporary memory)
NORM_CHUNK_ROWS = 2048


@dataclass
class AdapterExtras:
    """CPU tensors of an adapter's non-A/B parts (empty for a plain LoRA)."""

    shift: dict = field(default_factory=dict)       # family -> [num_layers, N] float32
    magnitudes: dict = field(default_factory=dict)  # (layer, module) -> [N_s] float32 (DoRA)
    head: tuple | None = None   # ("full", W [V, H]) or ("lora", A [r, H], B·scaling [V, r])
    # ("full", W [V, H]): x = W[token], or ("lora", Aᵀ [V, r], B·scaling [H, r]):
    # x += Aᵀ[token] @ (B·scaling)ᵀ
    embed: tuple | None = None

    def tensors(self) -> list:
        return [*self.shift.values(), *self.magnitudes.values(),
                *(self.head[1:] if self.head else ()), *(self.embed[1:] if self.embed else ())]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def full_copies(self) -> int:
        """Full trained matrices (lm_head, embed_tokens) among the extras."""
        return sum(1 for part in (self.head, self.embed) if part is not None and part[0] == "full")

    @property
    def full_copy_bytes(self) -> int:
        return sum(part[1].numel() * part[1].element_size() for part in (self.head, self.embed)
                   if part is not None and part[0] == "full")

    def __bool__(self) -> bool:
        return bool(self.shift or self.magnitudes or self.head or self.embed)

    def map(self, fn) -> AdapterExtras:
        """The same extras with every tensor t replaced by fn(t), in ``tensors()``' order."""
        return AdapterExtras({k: fn(v) for k, v in self.shift.items()},
                             {k: fn(v) for k, v in self.magnitudes.items()},
                             self.head and (self.head[0], *map(fn, self.head[1:])),
                             self.embed and (self.embed[0], *map(fn, self.embed[1:])))


def base_fingerprint(weight: torch.Tensor) -> torch.Tensor:
    """Row sums [V] in float64 on the CPU: tells a saved copy of a base matrix from another."""
    return torch.sum(weight.detach(), dim=1, dtype=torch.float64).cpu()  # no full-size copy


def load_extras(spec: AdapterSpec, raw: dict, layout) -> AdapterExtras:
    """Build an adapter's extras from its raw tensors (``raw``: name -> tensor) for ``layout``
    (engine.lora.slot_layout.LayoutShapes); refuses what this base cannot serve. Heads and
    embedding LoRAs take the dtype of the model's embedding (the hidden states' dtype)."""
    out = AdapterExtras()
    dtype = layout.embed_dtype
    _check_base_copies(spec, raw, layout)
    for (layer, m), name in spec.lora_biases.items():
        _add_shift(out, layout, layer, m, raw[name].float() * spec.modules[(layer, m)][3])
    for (layer, m), name in spec.bias_overrides.items():
        base = layout.base_bias.get((layer, m))
        if base is None:
            raise UnsupportedAdapterError(
                f"adapter {spec.path}: it replaces the bias of layer {layer} {m}, which this "
                "engine's base does not keep as a plain tensor (a quantized base)")
        _add_shift(out, layout, layer, m, raw[name].float() - base)
    for (layer, m), name in spec.magnitudes.items():
        f, _ = layout.slice_of[m]
        if (f, layer) in layout.quantized:
            raise UnsupportedAdapterError(f"adapter {spec.path}: DoRA needs the base weights; "
                                          "it is not supported on a quantized base")
        out.magnitudes[(layer, m)] = raw[name].float().contiguous()
    if spec.head_weight is not None:
        out.head = ("full", raw[spec.head_weight].to(dtype).contiguous())
    elif spec.head_lora is not None:
        a_name, b_name, _r, scaling, transposed = spec.head_lora
        a, b = raw[a_name].float(), raw[b_name].float()
        if transposed:
            a, b = a.t(), b.t()
        out.head = ("lora", a.to(dtype).contiguous(), (b * scaling).to(dtype).contiguous())
    if spec.embed_weight is not None:
        out.embed = ("full", raw[spec.embed_weight].to(dtype).contiguous())
    elif spec.embed_lora is not None:
        a_name, b_name, _r, scaling = spec.embed_lora
        out.embed = ("lora", raw[a_name].float().t().to(dtype).contiguous(),
                     (raw[b_name].float() * scaling).to(dtype).contiguous())
    return out


def _add_shift(out: AdapterExtras, layout, layer: int, module: str, delta: torch.Tensor) -> None:
    f, s = layout.slice_of[module]
    fam = layout.families[f]
    buf = out.shift.get(f)
    if buf is None:
        buf = out.shift[f] = torch.zeros(len(fam.layers), sum(fam.slice_sizes))
    off = fam.slice_offsets[s]
    buf[layout.layer_pos[f][layer], off:off + fam.slice_sizes[s]] += delta


def _check_base_copies(spec: AdapterSpec, raw: dict, layout) -> None:
    """PEFT saves the base embedding / lm_head next to a LoRA on them; serve the adapter only
    when that copy is the base's own matrix (a retrained one would replace it)."""
    for part, name in spec.base_copies.items():
        ours = layout.base_fingerprints[part]
        theirs = base_fingerprint(raw[name])
        tol = 1e-3 * (torch.sum(raw[name].abs(), dim=1, dtype=torch.float64) + 1e-6)
        if not bool(((ours - theirs).abs() <= tol).all()):
            raise BaseModelMismatchError(
                f"adapter {spec.path}: its saved {part} weights ({name!r}) differ from the base's;"
                f" an adapter that replaces the base {part} is not supported")


class SlotExtras:
    """The device side: per-slot shift/scale buffers of the linear layers (allocated per module
    kind on first use, so CUDA graphs keep valid pointers), and the model's per-slot heads and
    embedding LoRAs."""

    def __init__(self, layout, max_loras: int, device: torch.device):
        self.layout, self.max_loras, self.device = layout, max_loras, device
        self.affine: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # family -> (scale, shift)
        self.used: dict[int, set[str]] = {}   # slot -> families whose rows it set

    def _buffers(self, family: str) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self.affine.get(family)
        if pair is None:
            fam = self.layout.families[family]
            # row max_loras stays the identity: rows without an adapter index it
            shape = (self.max_loras + 1, len(fam.layers), sum(fam.slice_sizes))
            pair = (torch.ones(shape, device=self.device), torch.zeros(shape, device=self.device))
            self.affine[family] = pair
            for p, layer in enumerate(fam.layers):
                mod = self.layout.modules[(family, layer)]
                mod.slot_scale, mod.slot_shift = pair[0][:, p], pair[1][:, p]
        return pair

    def clear(self, slot: int) -> None:
        """Reset ``slot`` to no extras (its rows then pass through unchanged)."""
        for f in self.used.pop(slot, ()):
            scale, shift = self.affine[f]
            scale[slot].fill_(1.0)
            shift[slot].zero_()
            for layer in self.layout.families[f].layers:
                self.layout.modules[(f, layer)].affine_slots.discard(slot)
        model = self.layout.model
        model.slot_heads.pop(slot, None)
        model.slot_embeds.pop(slot, None)

    def write(self, slot: int, extras: AdapterExtras | None,
              rows: tuple[int, int] = (0, 0)) -> None:
        """Set ``slot``'s extras; call after its A/B are in place (DoRA reads them: ``rows``,
        the first row and number of rows of its block in the row buffers)."""
        self.clear(slot)
        if not extras:
            return
        families = set(extras.shift) | {self.layout.slice_of[m][0] for _, m in extras.magnitudes}
        for f in families:
            _, shift = self._buffers(f)
            if f in extras.shift:
                shift[slot].copy_(extras.shift[f], non_blocking=True)
            for layer in self.layout.families[f].layers:
                self.layout.modules[(f, layer)].affine_slots.add(slot)
        self.used[slot] = families
        for (layer, m), magnitude in extras.magnitudes.items():
            self._write_dora(slot, layer, m, magnitude, rows)
        model = self.layout.model
        if extras.head is not None:
            model.slot_heads[slot] = (extras.head[0], *map(self._to_device, extras.head[1:]))
        if extras.embed is not None:
            model.slot_embeds[slot] = (extras.embed[0], *map(self._to_device, extras.embed[1:]))

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        out = t.to(self.device, non_blocking=True)
        if out.is_cuda:  # copied on the slot writer's stream, read by the model's steps
            out.record_stream(torch.cuda.default_stream(self.device))
        return out

    @torch.no_grad()
    def _write_dora(self, slot: int, layer: int, module: str, magnitude: torch.Tensor,
                    rows: tuple[int, int]) -> None:
        """scale = magnitude / ||W + scaling·BA|| per output row; the base bias, which DoRA does
        not rescale, is compensated in the shift: shift += (1 - scale) · b."""
        f, s = self.layout.slice_of[module]
        fam, p = self.layout.families[f], self.layout.layer_pos[f][layer]
        mod = self.layout.modules[(f, layer)]
        off, n = fam.slice_offsets[s], fam.slice_sizes[s]
        first, count = rows
        w = mod.weight[off:off + n]
        a, b = mod.lora_a[s][first:first + count], mod.lora_b[s][:, first:first + count]
        norms = torch.empty(n, device=self.device)
        for i in range(0, n, NORM_CHUNK_ROWS):
            chunk = slice(i, min(n, i + NORM_CHUNK_ROWS))
            full = w[chunk].float() + b[chunk].float() @ a.float()
            norms[chunk] = torch.linalg.vector_norm(full, dim=1)
        g = magnitude.to(self.device, non_blocking=True) / norms
        scale, shift = self.affine[f]
        scale[slot, p, off:off + n] = g
        if mod.bias is not None:
            shift[slot, p, off:off + n] += (1.0 - g) * mod.bias[off:off + n].float()
