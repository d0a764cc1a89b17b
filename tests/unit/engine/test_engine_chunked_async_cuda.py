"""GPU: chunked prefill beside captured decode steps, and adapter copies on the side stream,
against the CPU path token for token (fp32); runs only with CUDA."""
from __future__ import annotations

import pytest
import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.engine.lora.slot_layout import read_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NAMES = ["qv_r8", "all_r4_rslora", "mlp_r16", "pattern"]


def _engine(base, device, **kw):
    return LLMEngine(EngineConfig(model=str(base.dir), device=device, dtype="float32",
                                  max_lora_rank=16, max_num_seqs=8, max_model_len=96,
                                  max_cpu_loras=8, **kw))


def _scenario(eng, base):
    """Two sequences decode; a long prompt joins (chunked by a small budget, so captured
    decode steps run while its rows hold a partial prefix); then more requests over four
    adapters with two slots, so adapters are swapped in while others decode."""
    reqs = [LoRARequest(n, i + 1, str(base.adapters[n])) for i, n in enumerate(NAMES)]
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    eng.add_request("a", [5, 6, 7], sp, reqs[0])
    eng.add_request("b", [8, 9], sp)
    eng.step()
    eng.add_request("long", list(range(10, 60)), sp, reqs[1])
    for i in range(6):
        eng.add_request(f"r{i}", [3 + i, 20 + i, 40], sp, reqs[(i + 2) % 4] if i % 3 else None)
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in eng.step()})
    return done


def test_chunked_prefill_and_side_stream_swaps_equal_cpu(tiny_llama):
    cpu = _scenario(_engine(tiny_llama, "cpu", max_loras=2, max_num_batched_tokens=4096),
                    tiny_llama)
    eng = _engine(tiny_llama, "cuda", max_loras=2, max_num_batched_tokens=8)
    gpu = _scenario(eng, tiny_llama)
    assert eng.runner.graphs is not None and eng.runner.graphs.captures >= 1
    assert eng.cache_stats()["gpu"]["evictions"] >= 1
    assert gpu == cpu


def test_loads_in_the_loader_process_equal_cpu_with_pinned_staging(tiny_llama):
    """lora_load_process on CUDA: the staging buffers come back from the loader process into
    pinned memory, and the tokens are the CPU path's while captured decode steps run."""
    cpu = _scenario(_engine(tiny_llama, "cpu", max_loras=2, max_num_batched_tokens=4096),
                    tiny_llama)
    eng = _engine(tiny_llama, "cuda", max_loras=2, max_num_batched_tokens=8,
                  lora_load_process=True)
    try:
        gpu = _scenario(eng, tiny_llama)
        assert eng.loras.process is not None and eng.loras.background_loads >= 4
        for lid in eng.loras.cpu.ids():
            w = eng.loras.cpu.peek(eng.loras.cpu.request(lid))
            assert all(t.is_pinned() for ab in w.staged.values() for t in ab)
        assert gpu == cpu
    finally:
        eng.loras.close()


def test_swap_on_cuda_writes_exactly_the_staging_buffer(tiny_llama):
    eng = _engine(tiny_llama, "cuda", max_loras=2)
    for i, n in enumerate(NAMES):
        req = LoRARequest(n, i + 1, str(tiny_llama.adapters[n]))
        eng.add_lora(req)
        slot = eng.loras.activate(req, set())
        eng.loras.gpu.wait_for([slot])
        w = eng.loras.cpu.peek(req)
        assert all(t.is_pinned() for ab in w.staged.values() for t in ab)
        gpu = eng.loras.gpu
        first, pages = gpu.block_of[slot]
        row0, rows = first * gpu.page, pages * gpu.page
        for kind, (a, b) in gpu.buffers.items():
            a_slot = read_rows(a, row0, rows).cpu()   # A may be folded under the weights
            b_slot = read_rows(b, row0, rows).cpu()
            sa, sb = w.staged.get(kind, (torch.zeros_like(a_slot), torch.zeros_like(b_slot)))
            assert torch.equal(a_slot, sa) and torch.equal(b_slot, sb), (n, kind)


RESERVE_CHECK = """
import json, sys, torch
from lorry.engine import EngineConfig, LLMEngine, LoRARequest
base, adapters, mb = json.loads(sys.argv[1])
eng = LLMEngine(EngineConfig(model=base, device="cuda", dtype="float32", max_loras=2,
                             max_lora_rank=16, max_num_seqs=8, max_model_len=96,
                             max_cpu_loras=8, pinned_reserve_mb=mb))
time_before = torch.cuda.host_memory_stats().get("host_alloc_time.count")
storages = {}   # each adapter stages in one pinned buffer; its A/B tensors are views of it
for i, (name, path) in enumerate(adapters.items()):
    eng.add_lora(LoRARequest(name, i + 1, path))
    w = eng.loras.cpu.peek(eng.loras.cpu.request(i + 1))
    for t in (t for ab in w.staged.values() for t in ab):
        assert t.is_pinned()
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
spans = [[p, p + n] for p, n in storages.items()]
first = torch.empty(1, dtype=torch.uint8, pin_memory=True).data_ptr()
print(json.dumps({"reserve": eng.cache_stats()["cpu"]["pinned_reserve"], "spans": spans,
                  "first": first, "stats": torch.cuda.host_memory_stats(),
                  "cuda_allocs": torch.cuda.host_memory_stats().get("host_alloc_time.count")
                  - time_before}))
"""


def test_staging_buffers_come_from_the_reserved_pinned_segment(tiny_llama):
    """EngineConfig.pinned_reserve_mb on CUDA (a process of its own: the segment is one per
    process): every adapter's pinned staging buffer is carved from the one segment made at
    engine start, with no cudaHostAlloc of its own (torch counts carved blocks in
    num_host_alloc too; host_alloc_time counts only its cudaHostAlloc calls), all within
    the segment's 64 MiB; without a reserve the loads call cudaHostAlloc."""
    import json
    import subprocess
    import sys

    def check(mb):
        arg = json.dumps([str(tiny_llama.dir),
                          {n: str(p) for n, p in tiny_llama.adapters.items()}, mb])
        out = subprocess.run([sys.executable, "-c", RESERVE_CHECK, arg], capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    got = check(64)
    assert got["reserve"] == {"mb": 64, "how": "set"}
    assert len(got["spans"]) == len(tiny_llama.adapters)
    assert got["cuda_allocs"] == 0, got
    low = min([got["first"]] + [a for a, _ in got["spans"]])
    assert max(b for _, b in got["spans"]) - low <= 64 << 20, got
    off = check(0)
    assert off["reserve"] == {"mb": 0, "how": "off"}
    assert off["cuda_allocs"] >= 1, off   # the loads' own cudaHostAlloc calls
