"""Compile the LoRA decode kernel for an H100/H200 (sm_90) here, with no GPU, and report it.

Prints one JSON object: registers per thread, spill bytes, shared memory, and the layout of
every tensor load (``sizePerThread`` 8 on a bf16 load is a 16-byte access; 1 is a 2-byte
scalar). This is how the B weight loads were found to be scalar (docs/BENCHMARKS.md, "LoRA
kernels (H200), 2026-12-01 (second session)"). Arguments are the JIT's, as the engine's
Llama-3-8B gate_up call passes them: 16-divisible integers and pointers, unit strides as
constants. Compile with the Triton the GPU machine has, for its register counts:

    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python benchmarks/kernel_report.py '{"PHASE": 2, "EXPAND_LOOP": 1}'

The JSON argument overrides constexprs (and num_warps / num_stages) of the base below. With
``"HAS_ROWS": true`` (row buffers, as the engine passes them) B's slot strides are 1 as well,
so the slot's first row decides the alignment of B's loads: ``ROW_ALIGN`` 16 keeps them 16-byte
(``ptx_loads``: ld.global.v4), 1 splits them into 2-byte loads (ld.global.b16).
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lorry.kernels.lora_decode_kernel import lora_decode_kernel

BASE = {"NUM_SLICES": 2, "ROWS": 4, "BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_R": 16,
        "BLOCK_K": 128, "SPLIT_K": 8, "PRECISION": "tf32", "UPCAST": False,
        "EXPAND_LOOP": 2, "STAGES": 3, "PHASE": 2, "USE_PDL": True,
        "num_warps": 4, "num_stages": 3}
UNIT_STRIDES = ("s_xh", "s_ah", "s_yn")      # 1 in every call: the JIT makes them constants


def compile_kernel(consts: dict):
    params = inspect.signature(lora_decode_kernel.fn).parameters
    names = list(params)
    consts = dict(consts)
    units = UNIT_STRIDES + (("s_bl0", "s_bl1", "s_bl2") if consts.get("HAS_ROWS") else ())
    options = {"num_warps": consts.pop("num_warps"), "num_stages": consts.pop("num_stages")}
    sig = {}
    for name in names:
        if "constexpr" in str(params[name].annotation) or name in units:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            ints = {"work_ptr": "*fp32", "table_ptr": "*i32", "rows_ptr": "*i32"}
            sig[name] = ints.get(name, "*bf16")
        else:
            sig[name] = "i32"
    consts.update({name: 1 for name in units})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if sig[n] != "constexpr"}
    src = ASTSource(fn=lora_decode_kernel, signature=sig, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_report(ptx: str) -> dict:
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((str(bindir / n) for n in ("ptxas-blackwell", "ptxas")
                  if (bindir / n).exists()), "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        Path(path).write_text(ptx)
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", path, "-o", os.devnull],
                             check=False, capture_output=True, text=True)
    text = out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    if regs is None:
        raise SystemExit(f"ptxas gave no register count ({ptxas}, rc {out.returncode}):\n{text}")
    return {"registers": int(regs.group(1)), "spill_store_bytes": int(spill.group(1))}


def load_layouts(ttgir: str) -> dict[str, int]:
    """'kind shape: sizePerThread [...]' -> how many such loads (plain, or async copies that
    the software pipeline issues)."""
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<\{[^}]*\}>)", ttgir, re.MULTILINE))
    found: dict[str, int] = {}
    pattern = (r"(tt\.load|ttg\.async_copy_global_to_local) .*?: "
               r"tensor<([\dx]+)x!tt\.ptr<(\w+)>, (#\w+)>")
    for op, shape, dtype, layout in re.findall(pattern, ttgir):
        per_thread = re.search(r"sizePerThread = \[([^\]]*)\]", layouts.get(layout, ""))
        key = (f"{'async' if 'async' in op else 'load'} {shape} {dtype}: sizePerThread "
               f"[{per_thread.group(1) if per_thread else '?'}]")
        found[key] = found.get(key, 0) + 1
    return found


def ptx_loads(ptx: str) -> dict[str, int]:
    """Global load instructions by kind (``ld.global.v4.b32``: 16 bytes; ``.b16``: 2)."""
    found: dict[str, int] = {}
    for op in re.findall(r"(ld\.global[.\w]*)", ptx):
        found[op] = found.get(op, 0) + 1
    return found


def main() -> None:
    consts = dict(BASE, **(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}))
    kernel = compile_kernel(consts)
    report = {"triton": triton.__version__, "constexprs": consts,
              "shared_bytes": kernel.metadata.shared, **ptxas_report(kernel.asm["ptx"]),
              "loads": load_layouts(kernel.asm["ttgir"]),
              "ptx_loads": ptx_loads(kernel.asm["ptx"])}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
