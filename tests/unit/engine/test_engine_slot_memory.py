"""LoRA slot memory shared by rank (EngineConfig.lora_memory_slots): more adapters than whole
slots would hold run at once, each reads only its own rows, the scheduler admits only what
fits next to the running adapters, and greedy tokens still equal PEFT's."""
from __future__ import annotations

import copy
import types

import pytest

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.engine.errors import LoRAError
from lorry.testing import make_peft_adapter
from tests.unit.engine.conftest import advance, peft_greedy

# ranks 64 and 32 next to the shared fixtures' 4-16: blocks of 4, 2 and 1 pages of 16 rows
WIDE = {"wide_r64": {"r": 64, "lora_alpha": 32, "target_modules": ("q_proj", "o_proj", "down_proj"),
                     "seed": 11},
        "mid_r32": {"r": 32, "lora_alpha": 16, "target_modules": "all-linear", "seed": 12}}


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    paths = dict(tiny_llama.adapters)
    for name, kw in WIDE.items():
        paths[name] = make_peft_adapter(tiny_llama.dir, root / name, base_model=tiny_llama.hf,
                                        **kw)
    return paths


@pytest.fixture(scope="module")
def peft(tiny_llama, adapters):
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(tiny_llama.hf), str(adapters[names[0]]),
                                      adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    return model.eval()


def _engine(base, **kw):
    cfg = {"max_loras": 6, "max_lora_rank": 64, "lora_memory_slots": 2, "max_num_seqs": 8,
           "max_model_len": 64, "device": "cpu", "dtype": "float32", "max_cpu_loras": 8, **kw}
    return LLMEngine(EngineConfig(model=str(base.dir), **cfg))


def _requests(adapters):
    return {name: LoRARequest(name, i + 1, str(p)) for i, (name, p) in enumerate(adapters.items())}


def _loaded(base, adapters):
    """An engine with every adapter in its CPU cache: (engine, requests, ids, slot manager)."""
    eng = _engine(base)
    reqs = _requests(adapters)
    for r in reqs.values():
        eng.add_lora(r)
    return eng, reqs, {n: r.lora_int_id for n, r in reqs.items()}, eng.loras.gpu


def test_more_adapters_than_whole_slots_run_together_and_match_peft(tiny_llama, adapters, peft):
    """Two rank-64 slots' memory (8 pages) for six adapters needing 1+1+1+1+2+4 pages: they
    cannot all be resident, so the scheduler holds some back, blocks are evicted and reused
    at other places, and still every row gets PEFT's greedy tokens."""
    eng = _engine(tiny_llama)
    reqs = _requests(adapters)
    for r in reqs.values():
        eng.add_lora(r)
    names = list(reqs)
    prompts = []
    for i in range(18):
        name = names[i % len(names)] if i % 7 else None
        prompt = [3 + (5 * i + j) % 150 for j in range(4 + i % 5)]
        prompts.append((prompt, name))
        eng.add_request(str(i), prompt, SamplingParams(max_tokens=5 + i % 4, temperature=0.0,
                                                       ignore_eos=True),
                        reqs[name] if name else None)
    outs, most = {}, 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            outs[o.request_id] = o.outputs[0].token_ids
        gpu = eng.loras.gpu
        most = max(most, len(gpu.slot_of))
        used = [p for p in gpu.pages if p is not None]
        assert len(used) <= len(gpu.pages)
        # every resident adapter's block is its own: no page has two owners
        for slot, (first, n) in gpu.block_of.items():
            assert gpu.pages[first:first + n] == [slot] * n and first % n == 0
    assert most > 2          # more adapters resident than two whole rank-64 slots would hold
    assert (eng.info()["max_loras"], eng.info()["lora_memory_slots"]) == (6, 2)
    stats = eng.cache_stats()["gpu"]
    assert stats["evictions"] >= 1 and stats["rows"] == 128
    for i, (prompt, name) in enumerate(prompts):
        want, _ = peft_greedy(peft, prompt, len(outs[str(i)]), name)
        assert outs[str(i)] == want, f"row {i} (adapter {name})"


def test_the_planner_admits_only_blocks_free_of_the_kept_adapters(tiny_llama, adapters):
    eng, reqs, lid, gpu = _loaded(tiny_llama, adapters)
    assert [gpu.pages_for(lid[n]) for n in ("qv_r8", "mid_r32", "wide_r64")] == [1, 2, 4]
    for name in ("qv_r8", "wide_r64", "mid_r32"):
        eng.loras.activate(reqs[name], {lid[n] for n in ("qv_r8", "wide_r64", "mid_r32")})
    place = {n: gpu.block_of[gpu.lookup(lid[n])] for n in ("qv_r8", "wide_r64", "mid_r32")}
    assert place == {"qv_r8": (0, 1), "wide_r64": (4, 4), "mid_r32": (2, 2)}
    room = gpu.planner({lid["qv_r8"], lid["wide_r64"], lid["mid_r32"]})
    assert room.fits(lid["mlp_r16"])            # page 1 is free
    room.add(lid["mlp_r16"])
    assert not room.fits(lid["all_r4_rslora"])  # every page is held now
    # kept: only the rank-8 adapter at page 0; the rank-64 one can go at pages 4-7 and a
    # rank-32 one at 2-3 -- but only placed largest first
    room = gpu.planner({lid["qv_r8"]})
    room.add(lid["wide_r64"])
    assert room.fits(lid["mid_r32"])
    room.add(lid["mid_r32"])
    assert room.fits(lid["mlp_r16"])            # the last free page
    room.add(lid["mlp_r16"])
    assert not room.fits(lid["pattern"])
    # whole memory held by running adapters: a pin that needs more is refused, clearly
    eng.pin_lora(lid["wide_r64"])
    eng.pin_lora(lid["mid_r32"])
    eng.pin_lora(lid["qv_r8"])
    eng.pin_lora(lid["mlp_r16"])
    with pytest.raises(LoRAError,
                       match=r"hold the LoRA slot memory its rank needs \(16 of 128 rows\)"):
        eng.pin_lora(lid["pattern"])
    # and a request for it is refused at once (it could never run until an unpin), changing
    # nothing; a request for a pinned adapter is taken
    sp = SamplingParams(max_tokens=2)
    with pytest.raises(LoRAError, match=r"pinned adapters hold the LoRA slot memory"):
        eng.add_request("r1", [5, 6], sp, reqs["pattern"])
    assert not eng.has_unfinished_requests()
    eng.add_request("r2", [5, 6], sp, reqs["mid_r32"])
    assert eng.has_unfinished_requests()


def test_rows_past_a_rank_are_read_by_nobody(tiny_llama, adapters):
    """A rank-8 adapter written where a rank-64 one was: its block's rows past rank 8 and
    the kinds it does not target are zero, and the slot table says rank 8 from its row."""
    eng = _engine(tiny_llama, max_loras=1, lora_memory_slots=1)
    reqs = _requests(adapters)
    for name in ("wide_r64", "qv_r8"):
        eng.add_lora(reqs[name])
        slot = eng.loras.activate(reqs[name], set())
    gpu = eng.loras.gpu
    first, n = gpu.block_of[slot]
    assert (first, n) == (0, 1) and gpu.rows.table[:, slot].tolist() == [0, 8]
    for layer, kind, mod in eng.model.lora_layers():
        for s, name in enumerate(mod.slice_names):
            a, b = mod.lora_a[s][:16], mod.lora_b[s][:, :16]
            if name in ("q_proj", "v_proj"):
                assert a[:8].any() and not a[8:].any() and not b[:, 8:].any()
            else:   # the rank-64 adapter's q/o/down rows are gone
                assert not a.any() and not b.any(), (layer, name)


def test_memory_slots_must_be_positive(tiny_llama):
    with pytest.raises(ValueError, match="lora_memory_slots"):
        EngineConfig(model=str(tiny_llama.dir), lora_memory_slots=0)


def test_what_the_planner_admits_the_engine_can_always_place():
    """Random slot memories, residents and admissions (torch-free SlotPages): every set of
    adapters the planner admits next to the kept ones is placed by make_room, largest first
    as the engine does, without evicting a kept adapter; blocks never overlap."""
    import random

    from lorry.engine.lora.slot_pages import SlotPages

    rng = random.Random(7)
    for trial in range(300):
        mem = SlotPages(rng.randint(2, 12), 64, rng.randint(1, 6))
        next_id = 1

        def new_adapter():
            nonlocal next_id
            mem.rank_of[next_id] = rng.choice([4, 8, 16, 24, 32, 48, 64])
            next_id += 1
            return next_id - 1

        for _ in range(rng.randint(0, 12)):            # earlier traffic: residents, LRU
            lid = new_adapter()
            if mem.block_free(set(), lid):
                mem.place(lid, *mem.make_room(lid, mem.pages_for(lid), set())[:2],
                          mem.pages_for(lid))
        held = {lid for lid in mem.slot_of if rng.random() < 0.5}
        room = mem.planner(held)
        admitted = set()
        for _ in range(rng.randint(1, 14)):
            lid = rng.choice(list(mem.slot_of)) if mem.slot_of and rng.random() < 0.5 \
                else new_adapter()
            fits = room.fits(lid)
            # the pass's cached answers are a fresh planner's
            assert fits == mem.planner(held | admitted).fits(lid), trial
            if fits:
                room.add(lid)
                admitted.add(lid)
        keep = held | admitted
        before = {lid: mem.slot_of[lid] for lid in keep if lid in mem.slot_of}
        for lid in mem.placement_order(i for i in admitted if i not in mem.slot_of):
            slot, first, _ = mem.make_room(lid, mem.pages_for(lid), keep)
            mem.place(lid, slot, first, mem.pages_for(lid))
        assert all(mem.slot_of.get(lid) == slot for lid, slot in before.items()), trial
        assert keep <= set(mem.slot_of) and len(mem.slot_of) <= mem.capacity, trial
        for slot, (first, n) in mem.block_of.items():
            assert mem.pages[first:first + n] == [slot] * n and first % n == 0, trial
        assert sum(n for _, n in mem.block_of.values()) == sum(p is not None for p in mem.pages)


def test_an_aged_waiter_drains_the_adapter_whose_block_it_needs():
    """Slot memory of 8 pages: a rank-64 adapter (4 pages, 3 rows) and four rank-8 ones (1
    page each, 1 row) run. A rank-64 waiter ages: draining the adapter with the fewest rows
    (a rank-8 one) would free one page, no 4-page block, so the rank-64 adapter drains (it is
    the one whose block the waiter can take) and the waiter gets in once its rows end."""
    from lorry.engine.kv_cache import BlockManager
    from lorry.engine.lora.slot_pages import SlotPages
    from lorry.engine.outputs import RequestMetrics
    from lorry.engine.scheduler import Scheduler
    from lorry.engine.sequence import Sequence

    def seq(rid, lid):
        return Sequence(rid, None, [1, 2, 3], SamplingParams(max_tokens=4),
                        LoRARequest(f"a{lid}", lid, f"/adapters/{lid}"), RequestMetrics(0.0))

    mem = SlotPages(8, 64, 2)                       # 8 pages of 16 rows
    mem.rank_of.update({1: 64, 2: 8, 3: 8, 4: 8, 5: 8, 9: 64})
    sch = Scheduler(max_num_seqs=16, max_loras=8, blocks=BlockManager(256, 16), max_bypass=2)
    sch.slot_memory = mem
    running = [seq(f"big{i}", 1) for i in range(3)] + [seq(f"small{k}", k) for k in (2, 3, 4, 5)]
    for s in running:
        sch.add(s)
    waiter = seq("waiter", 9)
    sch.add(waiter)
    life = {}
    for step in range(40):
        for k in (1, 1, 2 + step % 4):    # a stream for the running adapters, mostly the big one
            sch.add(seq(f"s{step}-{k}-{len(sch.waiting)}", k))
        plan = sch.schedule()
        new = {s.lora_id for s in plan.seqs if mem.lookup(s.lora_id) is None}
        for lid in mem.placement_order(new):                       # as the engine places
            slot, first, _ = mem.make_room(lid, mem.pages_for(lid), sch.running_adapters())
            mem.place(lid, slot, first, mem.pages_for(lid))
        if waiter in plan.seqs:
            break
        advance(sch, plan, life, 3)
    else:
        raise AssertionError("the rank-64 waiter never got in")
    assert step < 20
    running = {s.lora_id for s in sch.running}
    assert 1 not in running and mem.lookup(1) is None   # the rank-64 adapter made room for it
    assert len(running & {2, 3, 4, 5}) >= 3              # the small ones went on


def test_steps_count_their_adapters_and_rank_rows(tiny_llama, adapters):
    """cache_stats()["steps"] counts each step's distinct adapters and the sum of their ranks
    (benchmarks/bulk.py reports them per step): two rows of a rank-8 adapter, one of a
    rank-16 one and one without an adapter, in lock-step, are 2 adapters and ranks 24 a step,
    prompt step and decode steps alike."""
    eng = _engine(tiny_llama)
    reqs = _requests(adapters)
    for name in ("qv_r8", "mlp_r16"):
        eng.add_lora(reqs[name])     # loaded: every row is admitted in the first step
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for i, name in enumerate(["qv_r8", "qv_r8", "mlp_r16", None]):
        eng.add_request(str(i), [5, 6, 7, 8 + i], params, reqs[name] if name else None)
    while eng.has_unfinished_requests():
        eng.step()
    steps = eng.cache_stats()["steps"]
    prompt, decode = steps["prefill"], steps["decode"]
    assert prompt["steps"] == 1 and decode["steps"] == 5
    assert prompt["adapters"] == 2 and prompt["lora_ranks"] == 24
    assert decode["adapters"] == 2 * 5 and decode["lora_ranks"] == 24 * 5


def test_waiters_adapters_are_written_ahead_past_one_that_does_not_fit(tiny_llama, adapters):
    """The engine copies the next waiters' adapters into free blocks before their prefill.
    A rank-64 waiter whose 4-page block is held by running adapters is passed over, and a
    smaller adapter queued behind it still goes in."""
    eng, reqs, lid, gpu = _loaded(tiny_llama, adapters)
    eng.loras.activate(reqs["wide_r64"], set())                  # pages 0-3
    eng.loras.activate(reqs["qv_r8"], {lid["wide_r64"]})         # page 4
    gpu.remove(lid["wide_r64"])
    eng.loras.activate(reqs["mid_r32"], {lid["qv_r8"]})          # pages 0-1
    eng.loras.activate(reqs["mlp_r16"], {lid["qv_r8"], lid["mid_r32"]})   # page 2
    running = [types.SimpleNamespace(lora_id=lid[n]) for n in ("qv_r8", "mid_r32", "mlp_r16")]
    assert [gpu.block_of[gpu.lookup(lid[n])][0] for n in ("mid_r32", "mlp_r16", "qv_r8")] \
        == [0, 2, 4]
    sp = SamplingParams(max_tokens=2)
    eng.add_request("big", [5, 6], sp, reqs["wide_r64"])
    eng.add_request("small", [5, 7], sp, reqs["all_r4_rslora"])
    eng._prefetch_slots(running)
    assert gpu.lookup(lid["wide_r64"]) is None                   # no 4-page block is free
    assert gpu.lookup(lid["all_r4_rslora"]) is not None          # written ahead anyway
    for n in ("qv_r8", "mid_r32", "mlp_r16"):                    # the running ones stay
        assert gpu.lookup(lid[n]) is not None
