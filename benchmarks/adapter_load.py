"""How long an adapter takes to load beside a busy engine thread, on any machine (JSON).

The engine loads adapters (read, convert, stage in its slot layout) in a background thread
while its own thread issues steps. Every torch call of the loader releases and takes back the
GIL, and while the engine's thread runs Python it gives the GIL up only every switch interval
(5 ms), so a load made of many small tensor calls crawls beside it. This times
``engine.lora.weights.load_adapter_weights`` for PEFT adapters of Llama-3-8B shapes (q/k/v/o,
the bulk workload's targets; the slot layout built from the shapes alone, no model), alone and
beside a thread spinning in Python, and how much the spinning thread is slowed.

    PYTHONPATH=. python benchmarks/adapter_load.py [--rank 32] [--loads 5] [--switch-interval S]
        [--busy python|torch] [--process]

``--busy torch``: the busy thread makes tiny torch calls (each gives the GIL up, as the
engine's kernel launches do) instead of spinning in Python; ``--process``: the loads read in
the loader process (EngineConfig.lora_load_process) and the thread only copies the result.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bulk
from throughput import LLAMA3_8B

from lorry.engine.lora.slot_layout import SlotLayout
from lorry.engine.lora.spec import parse_adapter
from lorry.engine.lora.load_process import LoadProcess
from lorry.engine.lora.weights import load_adapter_weights, rehome
from lorry.testing import write_random_adapter


class ShapesOnly:
    """What SlotLayout reads of a model: its LoRA layers' slices, biases and two matrices."""

    def __init__(self, cfg: dict):
        h, n = cfg["hidden_size"], cfg["num_attention_heads"]
        kv = cfg["num_key_value_heads"] * h // n
        mods = {"qkv_proj": (["q_proj", "k_proj", "v_proj"], [h, kv, kv], h),
                "o_proj": (["o_proj"], [h], h)}
        self.layers = [(layer, name, types.SimpleNamespace(slice_names=s, slice_sizes=z,
                                                           in_features=i, bias=None))
                       for layer in range(cfg["num_hidden_layers"])
                       for name, (s, z, i) in mods.items()]
        self.embed_tokens = types.SimpleNamespace(weight=torch.zeros(8, 4))

    def lora_layers(self):
        return self.layers

    def lm_weight(self):
        return self.embed_tokens.weight


def spin(stop: threading.Event, count: list) -> None:
    """Python without a GIL release, as the engine's thread while it issues a step."""
    x = 0
    while not stop.is_set():
        for i in range(200):
            x += i
        count[0] += 1


def launch(stop: threading.Event, count: list) -> None:
    """Tiny torch ops back to back, as the engine's thread issuing kernels: each one gives
    the GIL up while it runs and must take it back."""
    x = torch.zeros(64)
    while not stop.is_set():
        for _ in range(20):
            x.add_(1.0)
        count[0] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--switch-interval", type=float, default=None, metavar="S",
                    help="sys.setswitchinterval for the run (the engine sets "
                         "engine.lora.manager.LOAD_SWITCH_INTERVAL while loads are pending; "
                         "default: Python's 0.005)")
    ap.add_argument("--busy", choices=("python", "torch"), default="python",
                    help="the busy thread: Python without a GIL release, or tiny torch ops "
                         "(each releases the GIL, as the engine's kernel launches do)")
    ap.add_argument("--process", action="store_true",
                    help="read in the loader process (engine.lora.load_process, as "
                         "EngineConfig.lora_load_process): the thread only copies its staging "
                         "buffer into its own memory")
    ap.add_argument("--separate-cores", action="store_true",
                    help="with --process: this process on the first core, the loader process "
                         "on the others (a host with cores to spare, as a GPU server, on a "
                         "small machine)")
    args = ap.parse_args()
    busy = spin if args.busy == "python" else launch
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    cfg = dict(LLAMA3_8B)
    layout = SlotLayout(ShapesOnly(cfg), 64)
    with tempfile.TemporaryDirectory(prefix="lorry-load-") as tmp:
        path = write_random_adapter(Path(tmp) / "a", cfg, r=args.rank,
                                    target_modules=bulk.TARGETS)
        spec = parse_adapter(path, cfg, max_lora_rank=64)

        proc = None
        if args.process:
            proc = LoadProcess({"adapter_roots": None, "base_config": cfg, "base_name": None,
                                "max_lora_rank": 64, "dtype": torch.bfloat16,
                                "max_full_copies": None, "layout": layout.shapes(),
                                "threads": min(4, torch.get_num_threads())})
            cores = sorted(os.sched_getaffinity(0))
            if args.separate_cores and len(cores) > 1:
                os.sched_setaffinity(proc._proc.pid, set(cores[1:]))
                os.sched_setaffinity(0, {cores[0]})

        def load():
            if proc is not None:
                spec_, *got = proc.load(str(path), None, "a")
                return rehome(spec_, layout, *got, False)
            return load_adapter_weights(spec, cfg, 64, torch.bfloat16, False, layout=layout)

        load()   # page cache, first-call costs
        alone = []
        for _ in range(args.loads):
            t0 = time.perf_counter()
            w = load()
            alone.append(time.perf_counter() - t0)
        stop, count, beside = threading.Event(), [0], []

        def loader():
            for _ in range(args.loads):
                t0 = time.perf_counter()
                load()
                beside.append(time.perf_counter() - t0)
            stop.set()

        th = threading.Thread(target=loader)
        t0 = time.perf_counter()
        th.start()
        busy(stop, count)
        th.join()
        spun = time.perf_counter() - t0
        stop2, count2 = threading.Event(), [0]
        threading.Timer(spun, stop2.set).start()
        busy(stop2, count2)   # the same time with no loader beside it
    ms = [round(x * 1e3, 1) for x in alone]
    res = {"benchmark": "adapter_load", "date": time.strftime("%Y-%m-%d"),
           "torch": torch.__version__, "rank": args.rank, "staged_mb": round(w.nbytes / 1e6, 1),
           "switch_interval_ms": sys.getswitchinterval() * 1e3, "busy": args.busy,
           "loads_in": "process" if args.process else "thread",
           "load_ms_alone": ms, "load_ms_alone_median": statistics.median(ms),
           "load_ms_beside_busy_thread": [round(x * 1e3, 1) for x in beside],
           "load_ms_beside_busy_thread_median": round(statistics.median(beside) * 1e3, 1),
           "busy_thread_speed_beside_loads": round(count[0] / max(count2[0], 1), 3)}
    if proc is not None:
        proc.close()
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
