"""``LLMEngine.compile_kernels`` runs every kernel variant a step can pick, so that a workload
after it compiles nothing new (a compile is ~1 s on an H100 with the engine waiting).

Every Triton kernel the engine launches is recorded (its constexprs, launch options, the
specialization class of each specialized integer, each pointer's type and 16-byte alignment:
what Triton compiles by) during the warm-up, which runs its steps for real, then over a
workload of many step shapes, recorded without running the kernels (the logits zeroed, so the
schedule is the same): prompt steps of every size up to the token budget, chunked prompts,
mixed steps with decode rows of many table widths, decode rounds. On CPU the engine runs its
CUDA path (fused norms, rotary and cache write, paged attention, the Triton LoRA kernels)
under TRITON_INTERPRET=1; also a base off the fused path (its prefill attention only for
chunks), a rank of 8 (work strides of both %16 classes) and a max_model_len that is not a
multiple of the block size (the widest table's last block partly past it).
"""
from __future__ import annotations

import random

import pytest
import torch

from lorry.testing import make_tiny_base_and_adapters
from tests.kernels.cases import record_kernels

ADAPTERS = {"a4": (4, 8, "all-linear", False), "b8": (8, 16, ("q_proj", "v_proj"), False),
            "c16": (16, 8, ("gate_proj", "up_proj", "down_proj"), False)}
CASES = {  # name -> (engine settings, adapters used, the fused path)
    "fused": (dict(max_lora_rank=16, max_model_len=96), ("a4", "b8", "c16"), True),
    "rank8_odd_len": (dict(max_lora_rank=8, max_model_len=99), ("a4", "b8"), True),
    "unfused": (dict(max_lora_rank=16, max_model_len=99), ("a4", "b8", "c16"), False),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_base_and_adapters(
        tmp_path_factory.mktemp("warmup"), ADAPTERS, hidden_size=48, num_layers=1,
        num_heads=4, num_kv_heads=2, intermediate_size=80)


def _engine(base, device, monkeypatch, fused=True, **kw):
    from lorry.engine import EngineConfig, LLMEngine
    from lorry.kernels.backends import get_lora_ops
    cfg = dict(model=str(base), dtype="float32", device=device.type, max_loras=4,
               max_lora_rank=16, max_cpu_loras=4, max_num_seqs=8,
               max_num_batched_tokens=48, block_size=8, max_model_len=96,
               # decode steps eager on CUDA too: graphs captured lazily mid-run compile their
               # own plans, which the warm-up leaves to capture_graphs (docs/INTERFACES.md)
               enforce_eager=True)
    eng = LLMEngine(EngineConfig(**{**cfg, **kw}))
    # the device tables, with the decode path opened to this tiny model's few columns and
    # its long tiles closed past 8 tokens a slot, so that steps take both LoRA paths
    from lorry.kernels import lora_decode, tuning
    table = tuning.for_device(device)["decode"]
    monkeypatch.setattr(lora_decode, "DECODE_CONFIG", dict(
        table, min_expand_cols=0, long=dict(table["long"], max_rows_per_slot=8)))
    if device.type == "cpu":
        # the engine takes the Triton path on CUDA only: under the interpreter, switch it on
        from lorry.engine.model import attention, llama
        monkeypatch.setattr(llama, "fused_ops_on", lambda x: True)
        monkeypatch.setattr(attention, "flash_decode", lambda q: True)
        eng.runner.ops = get_lora_ops("triton")
    if not fused:   # as Gemma 2/3, OLMo 2, Granite: torch layers, Triton attention and LoRA
        eng.model.use_triton_ops = False
    return eng


def _workload(rng: random.Random, paths: dict, n: int, lengths=(1, 3, 9, 20, 47, 70),
              answers=(1, 2, 5, 12), adapters=None):
    from lorry.engine import LoRARequest, SamplingParams
    names = [None, *sorted(paths)] if adapters is None else list(adapters)
    prompts, params, loras = [], [], []
    for i in range(n):
        # short and long prompts (past the 48-token budget: chunked), long and short answers
        prompts.append([rng.randrange(3, 120) for _ in range(rng.choice(lengths))])
        params.append(SamplingParams(max_tokens=rng.choice(answers), temperature=0.0,
                                     ignore_eos=True))
        name = names[i % len(names)]
        loras.append(None if name is None else
                     LoRARequest(name, 1 + sorted(paths).index(name), str(paths[name])))
    return prompts, params, loras


@pytest.mark.parametrize("case", sorted(CASES))
def test_after_compile_kernels_no_step_compiles_a_new_kernel_variant(case, tiny, device,
                                                                      monkeypatch):
    settings, names, fused = CASES[case]
    base, paths = tiny
    paths = {n: paths[n] for n in names}
    eng = _engine(base, device, monkeypatch, fused=fused, **settings)
    recs = record_kernels(monkeypatch)
    report = eng.compile_kernels(use_tqdm=False)
    assert report["steps"] > 0 and report["by"].get("lora") and \
        report["by"].get("decode attention") and report["by"].get("chunk"), report
    warm = {name: set(r.keys) for name, r in recs.items()}
    # the warm-up reached the LoRA kernels of both paths and both attention kernels
    for name in ("lora_decode_kernel", "lora_shrink_kernel", "lora_expand_kernel",
                 "_prefill_attn_kernel", "_decode_attn_kernel"):
        assert warm.get(name), (name, sorted(warm))
    assert bool(warm.get("_rotary_qk_kernel")) == fused
    # placeholders only: no sequence, no KV block taken, nothing queued
    assert eng.scheduler.blocks.num_free() == eng.scheduler.blocks.usable()
    assert not eng.scheduler.running and not eng.scheduler.waiting

    # the workload, its kernels recorded, not run (the logits zeroed: the same schedule), in
    # three calls: the later ones meet variants the first's short steps had not, which an
    # engine without the warm-up would compile mid-run (so the check below can fail)
    for r in recs.values():
        r.keys, r.plans, r.run = set(), set(), False
    monkeypatch.setattr(eng.model, "_softcap", lambda logits: torch.zeros_like(logits))
    rng = random.Random(0)
    seen = []
    for kw in (dict(n=4, lengths=(1, 2, 3), answers=(1,)),        # a few short steps first
               dict(n=24),                                        # every size, mixed adapters
               dict(n=10, lengths=range(15, 48), adapters=["a4"])):   # one adapter's tokens
        prompts, params, loras = _workload(rng, paths, **kw)
        outs = eng.generate(prompts, params, loras, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == p.max_tokens for o, p in zip(outs, params))
        seen.append({name: set(r.keys) for name, r in recs.items()})
    later = {k: seen[-1][k] - seen[0][k] for k in seen[-1] if seen[-1][k] - seen[0][k]}
    assert later, "the later calls met no variant the first had not"
    new = {name: sorted(keys - warm.get(name, set())) for name, keys in seen[-1].items()}
    assert not any(new.values()), {k: v for k, v in new.items() if v}


def test_probes_cover_every_decode_attention_key_of_an_h100_deployment(monkeypatch):
    # Llama-3-8B's heads on an H100's limits (132 SMs, 227 KiB of shared memory), the bulk
    # run's engine: every (decoding rows, table width) an eager step can hold, up to 256 rows
    # and 5,120 keys, maps to a key some probe runs
    import torch

    from lorry.engine import warmup
    from lorry.kernels import decode_attention as da

    monkeypatch.setattr(da, "num_sms", lambda device: 132)
    monkeypatch.setattr(da, "max_shared_mem", lambda device: 232448)
    dev, bf16 = torch.device("cpu"), torch.bfloat16
    lim = warmup.Limits(max_tokens=8192, max_rows=256, max_len=5120, block_size=16,
                        max_loras=96)
    probes = warmup.decode_probes(da.launch_key, {(8, 128, bf16)}, lim, dev)
    probed = {da.launch_key(p.decode_rows, 8, p.decode_blocks * 16, 128, bf16, dev)
              for p in probes}
    every = {da.launch_key(r, 8, w * 16, 128, bf16, dev)
             for r in range(1, 257) for w in range(1, 321)}
    assert probed == every and len(probes) == len(every)
    # both tiles, and splits from 1 up (the five variants the eighteenth session found
    # reachable only from eager rows, and those the graphs also meet)
    assert {k[1] for k in every} == {64, 128} and len({k[0] for k in every}) >= 3


def test_the_widest_decode_probe_stays_within_max_model_len(tiny, device, monkeypatch):
    # 99 tokens in blocks of 8: the widest table (13 blocks) reaches past the rotary tables'
    # 99 rows; a probe's decoding row sits at position 98 at most, as a real row does (the
    # torch rotary of a base off the fused path indexes its tables: an IndexError otherwise)
    from lorry.engine import warmup
    base, _ = tiny
    eng = _engine(base, device, monkeypatch, fused=False, max_model_len=99)
    lim = warmup.Limits(max_tokens=48, max_rows=8, max_len=99, block_size=8, max_loras=4)
    probe = warmup.Probe(1, 1, decode_rows=2, decode_blocks=13, why="decode attention")
    assert warmup.run_probes(eng.model, eng.runner, lim, [probe]) >= 0
