"""Slot layout: one row buffer per (fused module kind, A|B), shared by the adapters by rank.

For a fused kind (e.g. qkv_proj with slices q/k/v) the GPU holds
  A: [num_layers, num_slices, rows, in]   and   B: [num_layers, sum N_s, rows]
and each layer's ``mod.lora_a[s]`` [rows, in] / ``mod.lora_b[s]`` [N_s, rows] is a view into
them. An adapter takes a run of rows (its "block": its rank rounded up to a power-of-two number
of 16-row pages, ``block_rows``) starting at a multiple of the block, the same rows in every
kind and layer (kernels.segments.SlotRows tells the kernels where). Its pinned CPU staging
buffer has the layout of one block ([num_layers, S, block, in] and [num_layers, N, block],
zero past each module's rank), so writing it is one copy per kind and matrix.

Folded (``allocate(fold=True)``, CUDA decode): a kind's A rows are instead extra rows under
each layer's base weight (``LoRALinear.lora_ext`` [N + S*rows, in], FoldedA), so one matmul gives
the base output and every row's x·Aᵀ; a swap copies the adapter's A to the GPU once and spreads
it over the layers there.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from lorry.engine.errors import AdapterFormatError
from lorry.engine.lora.slot_pages import block_rows, page_rows

# fold a kind only while its A rows add at most this fraction to the base matmul's rows
FOLD_MAX_EXTRA = 0.5


@dataclass
class Family:
    """One fused module kind over the layers that have it."""

    name: str                 # fused module name, e.g. "qkv_proj"
    layers: list[int]         # model layer indices, in order
    slice_names: list[str]    # checkpoint module names, e.g. ["q_proj", "k_proj", "v_proj"]
    slice_sizes: list[int]    # output width of each slice
    in_features: int

    @property
    def slice_offsets(self) -> list[int]:
        return [sum(self.slice_sizes[:i]) for i in range(len(self.slice_sizes))]

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (len(self.layers), len(self.slice_names), rank, self.in_features)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (len(self.layers), sum(self.slice_sizes), rank)


class LayoutShapes:
    """What an adapter load needs of a slot layout, and nothing of the model: the families,
    where each (layer, checkpoint module) lives in them, the base's biases and matrix
    fingerprints, the embedding's dtype and which layers are quantized. It pickles (the
    loader process builds staging buffers with it); SlotLayout adds the model's modules."""

    def __init__(self, rank: int):
        self.rank = rank
        self.page = page_rows(rank)
        # Pinned-memory allocation is a CUDA call: from a loader thread it would invalidate a
        # CUDA graph being captured (global capture mode). Captures hold this lock too.
        self.pin_lock = threading.Lock()
        self.families: dict[str, Family] = {}
        self.slice_of: dict[str, tuple[str, int]] = {}
        self.layer_pos: dict[str, dict[int, int]] = {}
        self.base_bias: dict = {}
        self.base_fingerprints: dict = {}
        self.embed_dtype = torch.float32
        self.quantized: set = set()   # (family, layer) whose base weight is quantized

    def shapes(self) -> LayoutShapes:
        """A copy of these shapes without the model (for the loader process)."""
        out = LayoutShapes(self.rank)
        for key in ("families", "slice_of", "layer_pos", "base_bias", "base_fingerprints",
                    "embed_dtype", "quantized"):
            setattr(out, key, getattr(self, key))
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["pin_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.pin_lock = threading.Lock()

    def block_rows(self, rank: int) -> int:
        """Rows an adapter of ``rank`` takes (engine.lora.slot_pages.block_rows)."""
        return block_rows(rank, self.rank)

    def numel(self, family: str, rows: int) -> tuple[int, int]:
        """Elements of a ``rows``-row block's A and B for ``family``."""
        f = self.families[family]
        return (_prod(f.a_shape(rows)), _prod(f.b_shape(rows)))

    def stage(self, spec, raw: dict, dtype: torch.dtype, pin_memory: bool,
              alloc=None) -> dict:
        """Build the staging buffers of one adapter from its checkpoint tensors.

        ``spec.modules``: (layer, checkpoint module) -> (A name, B name, rank, scaling,
        transposed); ``raw``: the checkpoint's tensors by name. Returns {family: (A
        [num_layers, S, block, in], B [num_layers, N, block])} for the families the adapter
        touches (block: ``block_rows`` of its largest rank), in one (pinned) allocation (or
        ``alloc(numel, dtype)``'s zeroed 1-D tensor), zero
        where the adapter has no weights, B scaled. The modules of one slice and rank are
        stacked and written with a few tensor ops, not a few per module: a load runs in a
        background thread, and every torch call there waits for the GIL the engine's thread
        holds while it issues a step.
        """
        touched = sorted({self.slice_of[m][0] for _, m in spec.modules})
        rows = self.block_rows(max((r for _, _, r, _, _ in spec.modules.values()), default=1))
        sizes = [n for f in touched for n in self.numel(f, rows)]
        if alloc is not None:   # the loader process's: a new file, zeros already
            flat = alloc(sum(sizes), dtype)
        else:
            with self.pin_lock:
                flat = torch.empty(sum(sizes), dtype=dtype, pin_memory=pin_memory)
            flat.zero_()  # plain host memory work, outside the lock
        out, start = {}, 0
        for f in touched:
            fam = self.families[f]
            na, nb = self.numel(f, rows)
            a = flat[start:start + na].view(fam.a_shape(rows))
            b = flat[start + na:start + na + nb].view(fam.b_shape(rows))
            start += na + nb
            out[f] = (a, b)
        groups: dict = {}   # (family, slice, rank, transposed) -> [(layer position, key)]
        for (layer, m), (_a, _b, r, _sc, tr) in spec.modules.items():
            f, sl = self.slice_of[m]
            groups.setdefault((f, sl, r, tr), []).append((self.layer_pos[f][layer], (layer, m)))
        for (f, sl, r, tr), members in groups.items():
            fam = self.families[f]
            pos = torch.tensor([p for p, _ in members])
            keys = [k for _, k in members]
            # the tensors as read, against the shapes the header was checked with (the file
            # may have changed since; a rank-1 tensor would broadcast into r rows)
            a_want, b_want = (r, fam.in_features), (fam.slice_sizes[sl], r)
            if tr:
                a_want, b_want = a_want[::-1], b_want[::-1]
            for k in keys:
                for name, want in zip(spec.modules[k][:2], (a_want, b_want)):
                    if tuple(raw[name].shape) != want:
                        raise AdapterFormatError(
                            f"adapter {spec.path}: tensor {name!r} has shape "
                            f"{list(raw[name].shape)} where its header said {list(want)} "
                            "(was the file changed while it loaded?)")
            a_in = torch.stack([raw[spec.modules[k][0]] for k in keys])
            b_in = torch.stack([raw[spec.modules[k][1]] for k in keys])
            if tr:   # fan_in_fan_out checkpoints store A and B transposed
                a_in, b_in = a_in.transpose(1, 2), b_in.transpose(1, 2)
            scaling = torch.tensor([spec.modules[k][3] for k in keys], dtype=torch.float32)
            b_in = b_in.float() * scaling.view(-1, 1, 1)
            off = fam.slice_offsets[sl]
            out[f][0][pos, sl, :r] = a_in.to(dtype)
            out[f][1][pos, off:off + fam.slice_sizes[sl], :r] = b_in.to(dtype)
        return out


class SlotLayout(LayoutShapes):
    """The families of a model's LoRA layers and where each (layer, module) lives in them."""

    def __init__(self, model, rank: int):
        super().__init__(rank)
        self.modules = {}   # (family name, layer) -> LoRALinear
        for layer, name, mod in model.lora_layers():
            fam = self.families.get(name)
            if fam is None:
                fam = self.families[name] = Family(name, [], list(mod.slice_names),
                                                   list(mod.slice_sizes), mod.in_features)
            elif (fam.slice_names, fam.slice_sizes, fam.in_features) != \
                    (list(mod.slice_names), list(mod.slice_sizes), mod.in_features):
                raise ValueError(f"layer {layer} {name}: slices {mod.slice_names} "
                                 f"{mod.slice_sizes} x {mod.in_features} differ from layer "
                                 f"{fam.layers[0]}'s; the slot layout needs uniform layers")
            fam.layers.append(layer)
            self.modules[(name, layer)] = mod
        # checkpoint module name -> (family name, slice index)
        self.slice_of = {m: (f.name, i) for f in self.families.values()
                         for i, m in enumerate(f.slice_names)}
        self.layer_pos = {f.name: {lay: p for p, lay in enumerate(f.layers)}
                          for f in self.families.values()}
        self.model = model
        self.embed_dtype = model.embed_tokens.weight.dtype
        self.quantized = {key for key, mod in self.modules.items()
                          if getattr(mod, "base_op", None) is not None}
        self._base_info()

    def _base_info(self) -> None:
        """CPU copies the adapter loader compares against or subtracts (read once, here, so a
        loader thread never reads device memory): each (layer, checkpoint module)'s base bias
        (fp32) and fingerprints of the embedding and lm_head matrices."""
        from lorry.engine.lora.extras import base_fingerprint

        self.base_bias = {}
        for (f, layer), mod in self.modules.items():
            if mod.bias is None:
                continue
            bias = mod.bias.detach().float().cpu()
            fam = self.families[f]
            for m, off, n in zip(fam.slice_names, fam.slice_offsets, fam.slice_sizes):
                self.base_bias[(layer, m)] = bias[off:off + n].clone()
        self.base_fingerprints = {"embed_tokens": base_fingerprint(self.model.embed_tokens.weight),
                                  "lm_head": base_fingerprint(self.model.lm_weight())}

    def foldable(self, family: str, rows: int, dtype: torch.dtype) -> bool:
        """Whether ``family``'s A rows (``rows`` of them) can sit under its layers' weights."""
        fam = self.families[family]
        mods = [self.modules[(family, layer)] for layer in fam.layers]
        extra = len(fam.slice_names) * rows
        return (extra <= FOLD_MAX_EXTRA * sum(fam.slice_sizes)
                and all(m.base_op is None and m.bias is None and m.weight.dtype == dtype
                        for m in mods))

    def allocate(self, rows: int, dtype: torch.dtype, device: torch.device,
                 fold: bool = False) -> dict:
        """The GPU row buffers {family: (A, B)} of ``rows`` rows and each layer's lora_a /
        lora_b views into them (A a FoldedA for the kinds ``fold`` folds under the weights)."""
        bufs = {}
        for f, fam in self.families.items():
            b = torch.zeros(fam.b_shape(rows), dtype=dtype, device=device)
            if fold and self.foldable(f, rows, dtype):
                a = FoldedA(self, fam, rows, dtype, device)
            else:
                a = torch.zeros(fam.a_shape(rows), dtype=dtype, device=device)
            bufs[f] = (a, b)
            for p, layer in enumerate(fam.layers):
                mod = self.modules[(f, layer)]
                if not isinstance(a, FoldedA):
                    mod.lora_a = [a[p, s] for s in range(len(fam.slice_names))]   # [rows, in]
                mod.lora_b = [b[p, o:o + n] for o, n in zip(fam.slice_offsets, fam.slice_sizes)]
        if device.type == "cuda" and any(isinstance(a, FoldedA) for a, _ in bufs.values()):
            # the replaced base weights' blocks are too small for anything of their size to
            # come: give them back rather than hold the base twice in the caching allocator
            torch.cuda.empty_cache()
        return bufs


class FoldedA:
    """A kind's A row buffer as rows under each layer's base weight.

    Layer p's ``lora_ext`` is [N + S*rows, in]: rows :N are the base weight (``mod.weight`` is a
    view of them), row N + s*rows + j holds row j of slice s's A rows. Stands for the
    [num_layers, S, rows, in] buffer in the slot manager (numel, writes).
    """

    def __init__(self, layout: SlotLayout, fam: Family, rows: int, dtype: torch.dtype,
                 device: torch.device):
        S, H, N = len(fam.slice_names), fam.in_features, sum(fam.slice_sizes)
        self.shape = fam.a_shape(rows)
        self.dtype, self.device = dtype, device
        self.views = []                                       # per layer [S, rows, in]
        for layer in fam.layers:
            mod = layout.modules[(fam.name, layer)]
            ext = torch.empty(N + S * rows, H, dtype=dtype, device=device)
            ext[:N].copy_(mod.weight)
            ext[N:].zero_()
            mod.weight = nn.Parameter(ext[:N], requires_grad=False)   # the old one is freed
            mod.lora_ext = ext
            a = ext[N:].view(S, rows, H)
            mod.lora_a = [a[s] for s in range(S)]             # [rows, in]
            self.views.append(a)

    def numel(self) -> int:
        return _prod(self.shape)

    def element_size(self) -> int:
        return self.dtype.itemsize


def copy_into_rows(buf, first: int, src: torch.Tensor) -> None:
    """Rows first .. first + block of ``buf`` = src (an adapter's staging tensor of one kind:
    [num_layers, S, block, in] for A, [num_layers, N, block] for B)."""
    n = src.shape[2]
    dev = src.to(buf.device, non_blocking=True)               # one host-to-device copy
    if not isinstance(buf, FoldedA):
        buf.narrow(2, first, n).copy_(dev)
        return
    for p, view in enumerate(buf.views):
        view[:, first:first + n].copy_(dev[p])


def read_rows(buf, first: int, n: int) -> torch.Tensor:
    """Rows first .. first + n of ``buf`` as one tensor of the staging shape (a copy for a
    FoldedA)."""
    if not isinstance(buf, FoldedA):
        return buf.narrow(2, first, n)
    return torch.stack([view[:, first:first + n] for view in buf.views])


def zero_rows(buf, first: int, n: int) -> None:
    if not isinstance(buf, FoldedA):
        buf.narrow(2, first, n).zero_()
        return
    for view in buf.views:
        view[:, first:first + n].zero_()


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
