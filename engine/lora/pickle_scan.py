"""Torch-free check of a pickled adapter_model.bin: which globals would unpickling import?

A .bin is only ever loaded with torch.load(weights_only=True), but the API has no torch and
must refuse such a file at registration. Walking the pickle opcodes (never executing them)
lists every global it references; anything beyond tensor rebuilding is refused.
"""
from __future__ import annotations

import pickletools
import zipfile
from pathlib import Path

# What torch.save of a plain state dict references (tensor rebuild helpers, storage types).
_ALLOWED_MODULES = {"torch._utils", "torch"}
_ALLOWED_NAMES = {("collections", "OrderedDict")}
_ALLOWED_TORCH_NAMES = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                        "FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage",
                        "UntypedStorage", "float32", "float16", "bfloat16", "Size"}
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
               "BINSTRING", "STRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def _pickle_bytes(path: Path) -> list[bytes]:
    """The pickle streams of a file: data.pkl inside torch's zip format, or the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return [zf.read(n) for n in zf.namelist() if n.endswith(".pkl")]
    return [path.read_bytes()]


def referenced_globals(data: bytes) -> list[str]:
    """Every 'module.name' the pickle would import; '?' where it cannot be resolved."""
    found, strings, memo, last = [], [], {}, None
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in _STRING_OPS:
            last = arg
            strings.append(arg)
        elif name in _GET_OPS:
            last = memo.get(arg)
            strings.append(last)
        elif name in _PUT_OPS:
            memo[arg] = last
        elif name == "MEMOIZE":
            memo[len(memo)] = last
        elif name in ("GLOBAL", "INST"):
            found.append(arg.replace(" ", "."))
            last = None
        elif name == "STACK_GLOBAL":
            mod, attr = (strings[-2], strings[-1]) if len(strings) >= 2 else (None, None)
            found.append(f"{mod}.{attr}" if isinstance(mod, str) and isinstance(attr, str) else "?")
            last = None
        else:
            last = None
    return found


def _allowed(qualified: str) -> bool:
    mod, _, attr = qualified.rpartition(".")
    if (mod, attr) in _ALLOWED_NAMES:
        return True
    return mod in _ALLOWED_MODULES and attr in _ALLOWED_TORCH_NAMES


def unsafe_globals(path: str | Path) -> list[str]:
    """Globals in ``path``'s pickle(s) that a tensor-only checkpoint never needs (empty = ok)."""
    bad = []
    for data in _pickle_bytes(Path(path)):
        bad += [g for g in referenced_globals(data) if not _allowed(g)]
    return sorted(set(bad))
