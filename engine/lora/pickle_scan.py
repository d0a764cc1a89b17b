"""Torch-free check that a pickled adapter_model.bin is a plain state dict of tensors.

The engine loads a .bin only with ``torch.load(weights_only=True)``, but the API has no torch
and must refuse at registration every .bin that loader would refuse. Nothing is unpickled:
the opcode stream is interpreted over a simulated stack and memo, as torch's weights-only
unpickler runs it, and only what ``torch.save`` of a dict of tensors writes is allowed
(an allowlist of opcodes, globals and calls; everything else is refused).
"""
from __future__ import annotations

import io
import pickletools
import re
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

# The opcodes torch's weights-only unpickler executes (a pickle with any other is refused by
# torch.load(weights_only=True)); torch.save writes protocol 2 with a subset of them.
ALLOWED_OPCODES = frozenset({
    "PROTO", "STOP", "MARK", "GLOBAL", "REDUCE", "NEWOBJ", "BUILD", "BINPERSID",
    "EMPTY_DICT", "EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_SET", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "SETITEM", "SETITEMS", "APPEND", "APPENDS", "NONE", "NEWTRUE", "NEWFALSE",
    "BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE", "SHORT_BINSTRING",
    "BINGET", "LONG_BINGET", "BINPUT", "LONG_BINPUT"})
# The globals torch.save of float tensors references: rebuild functions (called on a storage),
# OrderedDict (the empty backward-hooks argument, or the state dict itself), and the storage
# types named inside persistent ids. A subset of what torch's weights-only loader allows.
REBUILD_TENSOR = frozenset({"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"})
REBUILD_PARAMETER = "torch._utils._rebuild_parameter"
ORDERED_DICT = "collections.OrderedDict"
# storage type -> bytes per element
STORAGE_TYPES = {"torch.FloatStorage": 4, "torch.HalfStorage": 2, "torch.BFloat16Storage": 2,
                 "torch.DoubleStorage": 8}
ALLOWED_GLOBALS = REBUILD_TENSOR | set(STORAGE_TYPES) | {REBUILD_PARAMETER, ORDERED_DICT}
MAX_PICKLE_BYTES = 64 * 1024 * 1024  # data.pkl of a state dict holds names and shapes only
# An adapter's tensors have 1 or 2 dimensions; 800,000 of them made a shape's product of huge
# integers quadratic (19 s for one safetensors header, a review)
MAX_DIMS = 4
MAX_PROBLEMS = 50  # a refused stream is followed until this many problems are listed
_ZIP_MAGIC = b"PK\x03\x04"  # torch.load takes a file as a zip archive only if it starts so
_STORAGE_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class ScanResult:
    """What a weights-only load would refuse in a checkpoint (both lists empty: acceptable).

    ``imports`` lists the globals beyond tensor rebuilding that unpickling would import,
    resolved from the simulated stack ('module.name'); ``problems`` everything else.
    """

    imports: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    storages: dict[str, int] = field(default_factory=dict)  # key -> bytes the tensors read
    shapes: dict[str, tuple] = field(default_factory=dict)  # state dict name -> tensor shape
    tensor_bytes: int = 0   # the state dict's tensors' own bytes (storages may hold more)

    @property
    def ok(self) -> bool:
        return not self.imports and not self.problems

    def describe(self, limit: int = 5) -> str:
        """One line naming the imports first, then the other problems."""
        parts = []
        if self.imports:
            parts.append("imports " + ", ".join(sorted(set(self.imports))[:limit]))
        parts += self.problems[:limit]
        return "; ".join(parts)


class _Malformed(Exception):
    """The stream cannot be followed further (truncated, stack underflow, bad memo index)."""


@dataclass(frozen=True)
class _Global:
    name: str  # 'module.qualname'


class _Storage:
    def __init__(self, key: str, numel: int, itemsize: int):
        self.key, self.numel, self.itemsize = key, numel, itemsize


class _Tensor:
    def __init__(self, shape: tuple = (), nbytes: int = 0):
        self.shape, self.nbytes = shape, nbytes   # bytes of its elements, in its storage's type


class _Dict:
    def __init__(self, ordered: bool):
        self.ordered, self.items = ordered, []


class _List:
    def __init__(self):
        self.items = []


class _Set:
    pass


@dataclass(frozen=True)
class _Unknown:
    what: str  # a value a refused opcode or call would produce


_MARK = pickletools.markobject


class _Machine:
    """Runs the opcode stream over a simulated stack, memo and mark stack; never imports."""

    def __init__(self, data: bytes):
        self.f = io.BytesIO(data)
        self.size = len(data)
        self.stack: list = []
        self.metastack: list[list] = []
        self.memo: dict[int, object] = {}
        self.refused_ops: set[str] = set()
        self.empty_dicts: list[_Dict] = []  # hooks/metadata arguments: still empty at STOP
        self.out = ScanResult()

    # ---- stack helpers (an underflow is a malformed stream: torch's loader fails too) ------
    def push(self, value) -> None:
        self.stack.append(value)

    def pop(self):
        if not self.stack:
            raise _Malformed("stack underflow")
        return self.stack.pop()

    def top(self):
        if not self.stack:
            raise _Malformed("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.metastack:
            raise _Malformed("no MARK to pop to")
        items, self.stack = self.stack, self.metastack.pop()
        return items

    def _import(self, full: str) -> None:
        """Push the global ``full`` ('module.name'); note it unless tensor rebuilding needs it."""
        if full in ALLOWED_GLOBALS:
            self.push(_Global(full))
        else:
            self.out.imports.append(full)
            self.push(_Unknown(full))

    def problem(self, text: str, pos: int) -> None:
        self.out.problems.append(f"{text} (byte {pos})")

    # ---- the run ---------------------------------------------------------------------------
    def run(self) -> ScanResult:
        first = True
        while len(self.out.problems) < MAX_PROBLEMS:
            pos = self.f.tell()
            code = self.f.read(1)
            if not code:
                self.problem("the pickle ends without STOP", pos)
                return self.out
            op = pickletools.code2op.get(code.decode("latin-1"))
            if op is None:
                self.problem(f"unknown opcode {code!r}", pos)
                return self.out
            try:
                arg = self._read_arg(op)
                if first and op.name != "PROTO":
                    self.problem("the pickle does not start with PROTO (torch.save writes it "
                                 "first)", pos)
                first = False
                if op.name == "STOP":
                    self._stop(pos)
                    return self.out
                if op.name in ALLOWED_OPCODES:
                    self._allowed(op.name, arg, pos)
                else:
                    if op.name not in self.refused_ops:  # each opcode named once
                        self.refused_ops.add(op.name)
                        self.problem(f"opcode {op.name} is not allowed in a weights-only "
                                     "checkpoint", pos)
                    self._refused(op, arg, pos)
            except _Malformed as e:
                self.problem(f"malformed pickle: {e} at {op.name}", pos)
                return self.out
        return self.out

    def _read_arg(self, op):
        if op.arg is None:
            return None
        if op.name in ("GLOBAL", "INST"):  # two lines, decoded as torch's loader does
            lines = [self.f.readline() for _ in range(2)]
            if not all(line.endswith(b"\n") for line in lines):
                raise _Malformed("truncated GLOBAL")
            try:
                return tuple(line[:-1].decode("utf-8") for line in lines)
            except UnicodeDecodeError:
                raise _Malformed("GLOBAL name is not UTF-8") from None
        try:
            return op.arg.reader(self.f)
        except ValueError as e:
            raise _Malformed(f"bad argument ({e})") from None

    def _stop(self, pos: int) -> None:
        result = self.pop()
        if self.f.tell() != self.size:
            self.problem(f"{self.size - self.f.tell()} bytes follow STOP", pos)
        if any(d.items for d in self.empty_dicts):  # filled later through a memo alias
            self.problem("a tensor's backward hooks or metadata are set", pos)
        if not isinstance(result, _Dict):
            self.problem(f"the pickled object is {_kind(result)}, not a dict of tensors", pos)
            return
        for key, value in result.items:
            if not isinstance(key, str) or not isinstance(value, _Tensor):
                self.problem(f"state dict entry {_kind(key)} -> {_kind(value)} is not "
                             "'name' -> tensor", pos)
                return
            self.out.shapes[key] = value.shape
            self.out.tensor_bytes += value.nbytes

    # ---- opcodes torch's weights-only loader runs: its semantics, narrowed to torch.save's --
    def _allowed(self, name: str, arg, pos: int) -> None:
        rule = _RULES.get(name)
        if rule is None:  # an opcode in ALLOWED_OPCODES without a rule is a bug of this module
            raise AssertionError(name)
        rule(self, name, arg, pos)

    def _push_arg(self, name: str, arg, pos: int) -> None:
        self.push(arg)

    def _push_new(self, name: str, arg, pos: int) -> None:
        self.push(_NEW_VALUES[name]())

    def _proto(self, name: str, arg, pos: int) -> None:
        if arg < 2:
            self.problem(f"pickle protocol {arg} (torch.save writes 2)", pos)

    def _mark(self, name: str, arg, pos: int) -> None:
        self.metastack.append(self.stack)
        self.stack = []

    def _global(self, name: str, arg, pos: int) -> None:
        self._import(f"{arg[0]}.{arg[1]}")

    def _get(self, name: str, arg, pos: int) -> None:
        if arg not in self.memo:
            raise _Malformed(f"memo index {arg} was never stored")
        self.push(self.memo[arg])

    def _put(self, name: str, arg, pos: int) -> None:
        self.memo[arg] = self.top()

    def _tuple(self, name: str, arg, pos: int) -> None:
        if name == "TUPLE":
            self.push(tuple(self.pop_mark()))
        else:  # TUPLE1, TUPLE2, TUPLE3
            items = [self.pop() for _ in range(int(name[-1]))][::-1]
            self.push(tuple(items))

    def _setitems(self, name: str, arg, pos: int) -> None:
        if name == "SETITEM":
            value, key = self.pop(), self.pop()
            items = [key, value]
        else:
            items = self.pop_mark()
        target = self.top()
        if not isinstance(target, _Dict) or len(items) % 2:
            self.problem(f"{name} on {_kind(target)}", pos)
        elif not all(_plain_key(k) for k in items[::2]):
            self.problem(f"{name} with a key that is not a string, number or tuple", pos)
        else:
            target.items += list(zip(items[::2], items[1::2]))

    def _appends(self, name: str, arg, pos: int) -> None:
        items = [self.pop()] if name == "APPEND" else self.pop_mark()
        target = self.top()
        if not isinstance(target, _List):
            self.problem(f"{name} on {_kind(target)}", pos)
        else:
            target.items += items

    def _binpersid(self, name: str, arg, pos: int) -> None:
        self.push(self._persistent_id(self.pop(), pos))

    def _reduce(self, name: str, arg, pos: int) -> None:
        args = self.pop()
        self.stack[-1] = self._call(self.top(), args, pos)

    def _newobj(self, name: str, arg, pos: int) -> None:
        args, cls = self.pop(), self.pop()
        if cls == _Global(ORDERED_DICT) and args == ():
            self.push(_Dict(ordered=True))
        else:
            self.problem(f"NEWOBJ of {_kind(cls)} (torch.save of tensors never writes it)", pos)
            self.push(_Unknown("object"))

    def _build(self, name: str, arg, pos: int) -> None:
        state, target = self.pop(), self.top()
        if not (isinstance(target, _Dict) and target.ordered and _module_metadata(state)):
            self.problem(f"BUILD sets the state of {_kind(target)} to {_kind(state)} (only "
                         "an nn.Module state dict's '_metadata' is allowed)", pos)

    def _persistent_id(self, pid, pos: int):
        """torch's zip format names each tensor's bytes as ('storage', type, key, where, n)."""
        if (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _Global) and pid[1].name in STORAGE_TYPES
                and isinstance(pid[2], str) and _STORAGE_KEY.match(pid[2])
                and isinstance(pid[3], str) and isinstance(pid[4], int)
                and not isinstance(pid[4], bool) and pid[4] >= 0):
            nbytes = pid[4] * STORAGE_TYPES[pid[1].name]
            if self.out.storages.setdefault(pid[2], nbytes) != nbytes:
                self.problem(f"storage {pid[2]!r} is named with two sizes", pos)
            return _Storage(pid[2], pid[4], STORAGE_TYPES[pid[1].name])
        self.problem(f"persistent id {_kind(pid)} is not a float tensor storage", pos)
        return _Unknown("persistent id")

    def _call(self, func, args, pos: int):
        """REDUCE: only tensor rebuilds from a storage and an empty OrderedDict() are allowed."""
        if not isinstance(func, _Global) or not isinstance(args, tuple):
            self.problem(f"calls {_kind(func)}", pos)
            return _Unknown("call result")
        if func.name in REBUILD_TENSOR and _rebuild_args_ok(func.name, args):
            self.empty_dicts += [a for a in args[4:] if isinstance(a, _Dict)]
            size, numel = args[2], 1
            for n in size:
                numel *= n
            return _Tensor(size, numel * args[0].itemsize)
        if func.name == REBUILD_PARAMETER and len(args) == 3 and isinstance(args[0], _Tensor) \
                and isinstance(args[1], bool) and _empty_dict(args[2]):
            self.empty_dicts.append(args[2])
            return _Tensor(args[0].shape, args[0].nbytes)
        if func.name == ORDERED_DICT and args == ():
            return _Dict(ordered=True)
        self.problem(f"calls {func.name} with {_kind(args)} (allowed: tensor rebuilds of a "
                     "storage within its bounds, and OrderedDict())", pos)
        return _Unknown("call result")

    # ---- opcodes torch refuses: followed only to name what they would import --------------
    def _refused(self, op, arg, pos: int) -> None:
        name = op.name
        if name == "STACK_GLOBAL":  # module and name come from the simulated stack
            attr, module = self.pop(), self.pop()
            if isinstance(module, str) and isinstance(attr, str):
                self._import(f"{module}.{attr}")
            else:
                self.out.imports.append(f"<{_kind(module)}>.<{_kind(attr)}>")
                self.push(_Unknown("global"))
        elif name == "INST":  # imports a class and calls it on the items above MARK
            self.pop_mark()
            self._import(f"{arg[0]}.{arg[1]}")
            self.stack[-1] = _Unknown(f"{arg[0]}.{arg[1]} instance")
        elif name in ("EXT1", "EXT2", "EXT4"):
            self.out.imports.append(f"<copyreg extension {arg}>")
            self.push(_Unknown("extension"))
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name == "PUT":
            self.memo[arg] = self.top()
        elif name == "GET":
            if arg not in self.memo:
                raise _Malformed(f"memo index {arg} was never stored")
            self.push(self.memo[arg])
        elif name == "DUP":
            self.push(self.top())
        elif name == "POP":
            self.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif op.stack_after and op.stack_after[0].name in ("str", "bytes", "bytes_or_str") \
                and not op.stack_before:
            self.push(arg)  # STRING, SHORT_BINUNICODE, BINBYTES, ...: literal values
        else:  # the opcode's declared stack effect, with opaque results
            before = op.stack_before
            if _MARK in before:
                self.pop_mark()
                before = before[:before.index(_MARK)]
            for _ in before:
                self.pop()
            for _ in op.stack_after:
                self.push(_Unknown(name))


# The values the allowed opcodes without an argument push (made anew for each opcode).
_NEW_VALUES = {"NONE": lambda: None, "NEWTRUE": lambda: True, "NEWFALSE": lambda: False,
               "EMPTY_TUPLE": tuple, "EMPTY_DICT": lambda: _Dict(ordered=False),
               "EMPTY_LIST": _List, "EMPTY_SET": _Set}
# The opcodes that push their argument as a literal value.
_LITERAL_OPCODES = ("BININT", "BININT1", "BININT2", "LONG1", "BINFLOAT", "BINUNICODE",
                    "SHORT_BINSTRING")
# How each opcode of ALLOWED_OPCODES but STOP acts on the simulated stack and memo.
_RULES = {
    **dict.fromkeys(_NEW_VALUES, _Machine._push_new),
    **dict.fromkeys(_LITERAL_OPCODES, _Machine._push_arg),
    "PROTO": _Machine._proto, "MARK": _Machine._mark, "GLOBAL": _Machine._global,
    "BINGET": _Machine._get, "LONG_BINGET": _Machine._get,
    "BINPUT": _Machine._put, "LONG_BINPUT": _Machine._put,
    **dict.fromkeys(("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"), _Machine._tuple),
    "SETITEM": _Machine._setitems, "SETITEMS": _Machine._setitems,
    "APPEND": _Machine._appends, "APPENDS": _Machine._appends,
    "BINPERSID": _Machine._binpersid, "REDUCE": _Machine._reduce,
    "NEWOBJ": _Machine._newobj, "BUILD": _Machine._build,
}


def _empty_dict(value) -> bool:
    return isinstance(value, _Dict) and not value.items


def _module_metadata(state) -> bool:
    """The state nn.Module.state_dict()'s OrderedDict carries: {'_metadata': plain data}."""
    if not (isinstance(state, _Dict) and len(state.items) == 1
            and state.items[0][0] == "_metadata"):
        return False
    seen, todo = set(), [state.items[0][1]]
    while todo:  # iterative: a memo alias can make the structure cyclic
        value = todo.pop()
        if value is None or isinstance(value, (str, int, float)) or id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, _Dict):
            todo += [x for item in value.items for x in item]
        elif isinstance(value, _List):
            todo += value.items
        elif isinstance(value, tuple):
            todo += value
        else:
            return False
    return True


def _plain_key(key) -> bool:
    """A dict key torch can hash: a string, number, None, or a tuple of them."""
    todo = [key]
    while todo:
        value = todo.pop()
        if isinstance(value, tuple):
            todo += value
        elif not (value is None or isinstance(value, (str, int, float))):
            return False
    return True


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_args_ok(name: str, args: tuple) -> bool:
    """(storage, offset, size, stride[, requires_grad, empty hooks[, empty metadata]]), the
    tensor's elements inside its storage."""
    if name == "torch._utils._rebuild_tensor":
        form_ok = len(args) == 4
    else:
        form_ok = len(args) in (6, 7) and isinstance(args[4], bool) and _empty_dict(args[5]) \
            and (len(args) == 6 or _empty_dict(args[6]))
    if not form_ok:
        return False
    storage, offset, size, stride = args[:4]
    if not (isinstance(storage, _Storage) and _count(offset) and isinstance(size, tuple)
            and isinstance(stride, tuple) and len(size) == len(stride) <= MAX_DIMS
            and all(map(_count, size)) and all(map(_count, stride))):
        return False
    if 0 in size:
        return offset <= storage.numel
    return offset + sum((n - 1) * st for n, st in zip(size, stride)) < storage.numel


def _kind(value) -> str:
    """A short description of a simulated value for messages."""
    if isinstance(value, _Global):
        return value.name
    if isinstance(value, _Unknown):
        return value.what
    if isinstance(value, _Dict):
        return "an OrderedDict" if value.ordered else "a dict"
    if isinstance(value, _Tensor):
        return "a tensor"
    if isinstance(value, (_Storage, _List, _Set)):
        return f"a {type(value).__name__.strip('_').lower()}"
    if isinstance(value, tuple):
        return f"a {len(value)}-tuple"
    return type(value).__name__


def scan_pickle(data: bytes) -> ScanResult:
    """Interpret one pickle stream (never executing it); see ``ScanResult``."""
    machine = _Machine(data)
    try:
        return machine.run()
    except Exception as e:  # noqa: BLE001 - any stream this module cannot follow is refused
        machine.out.problems.append(f"the pickle cannot be followed: {type(e).__name__}: {e}")
        return machine.out


def _zip_member_problems(names: list[str]) -> tuple[str | None, list[str]]:
    """(the data.pkl member, problems) of torch's zip layout: '<archive>/data.pkl' the only
    pickle, every member under the one '<archive>/' folder, no odd paths or duplicates."""
    problems = []
    if len(set(names)) != len(names):
        problems.append("the archive names a member twice")
    archive = names[0].split("/", 1)[0] if names else ""
    for n in names:
        parts = n.split("/")
        if n.startswith("/") or "\\" in n or "\x00" in n or ".." in parts or len(parts) < 2 \
                or parts[0] != archive:
            problems.append(f"member {n!r} is outside torch's archive layout "
                            f"('{archive}/...')")
        elif n.lower().endswith(".pkl") and n != f"{archive}/data.pkl":
            problems.append(f"member {n!r} is a second pickle (torch.save writes only "
                            f"'{archive}/data.pkl')")
    main = f"{archive}/data.pkl"
    if main not in names:
        problems.append(f"no '{main}' member")
        return None, problems
    return main, problems


def scan_checkpoint(path: str | Path | bytes) -> ScanResult:
    """Check a .bin (a path, or its bytes: what is then loaded is what was scanned) as
    ``torch.load(weights_only=True)`` would read it, without torch.

    Only torch's zip format is accepted (what torch.save writes); its one pickle is
    interpreted, and each storage it names must be a member of the archive of its size.
    """
    if isinstance(path, bytes):
        data = path
        head = data[:len(_ZIP_MAGIC)]
        opened = io.BytesIO(data)
    else:
        path = Path(path)
        with open(path, "rb") as f:
            head = f.read(len(_ZIP_MAGIC))
            data = f.read((1 << 20) - len(head)) if head != _ZIP_MAGIC else b""
        data = head + data
        opened = path
    if head != _ZIP_MAGIC:
        # torch.load would read it as the legacy format: still name what its pickle imports
        out = scan_pickle(data[:1 << 20])
        out.problems.insert(0, "not torch's zip format (legacy or non-torch pickles are "
                               "refused)")
        return out
    try:
        with zipfile.ZipFile(opened) as zf:
            sizes = {i.filename: i.file_size for i in zf.infolist()}
            main, problems = _zip_member_problems([i.filename for i in zf.infolist()])
            # torch.save stores every member uncompressed; a compressed storage of a few KB
            # can declare gigabytes of zeros, all of it allocated by torch.load
            problems += [f"member '{i.filename}' is compressed (torch.save stores members "
                         "uncompressed)" for i in zf.infolist()
                         if i.compress_type != zipfile.ZIP_STORED][:3]
            if main is None:
                return ScanResult(problems=problems)
            archive = main.rsplit("/", 1)[0]
            if sizes[main] > MAX_PICKLE_BYTES:
                too_big = f"{main} is {sizes[main]} bytes (at most {MAX_PICKLE_BYTES})"
                return ScanResult(problems=[*problems, too_big])
            out = scan_pickle(zf.read(main))
            order = f"{archive}/byteorder"
            if order in sizes and (sizes[order] > 8 or zf.read(order) not in (b"little", b"big")):
                problems.append(f"'{order}' is neither 'little' nor 'big'")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError,
            NotImplementedError, zlib.error) as e:
        return ScanResult(problems=[f"unreadable zip archive: {e}"])
    out.problems[:0] = problems
    if f"{archive}/version" not in sizes:
        out.problems.append(f"no '{archive}/version' member")
    for key, nbytes in sorted(out.storages.items()):
        got = sizes.get(f"{archive}/data/{key}")
        if got != nbytes:
            out.problems.append(f"storage {key!r} needs {nbytes} bytes, its member "
                                f"'{archive}/data/{key}' has {got}")
    return out
