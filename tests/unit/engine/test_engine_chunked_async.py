"""Chunked prefill, background adapter loads and the scheduler's aging rule."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.engine.kv_cache import BlockManager
from lorry.engine.outputs import RequestMetrics
from lorry.engine.scheduler import Scheduler
from lorry.engine.sequence import Sequence
from tests.unit.engine.conftest import advance

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _engine(base, **kw):
    cfg = {"max_loras": 4, "max_lora_rank": 16, "max_cpu_loras": 8, "max_num_seqs": 8,
           "max_model_len": 128, "device": "cpu", **kw}   # CUDA: the *_cuda test file
    return LLMEngine(EngineConfig(model=str(base.dir), **cfg))


def _capture(eng):
    got = {}
    eng.runner.logits_hook = lambda seqs, logits: [
        got.setdefault(s.request_id, []).append(r.clone()) for s, r in zip(seqs, logits)]
    return got


def _count_prefill_chunks(eng):
    calls = []
    orig = eng.runner.prefill

    def prefill(seqs, slots, chunks=None):
        calls.append(list(chunks))
        return orig(seqs, slots, chunks)
    eng.runner.prefill = prefill
    return calls


def test_chunked_prefill_equals_unchunked(tiny_llama):
    reqs = [LoRARequest(n, i + 1, str(p)) for i, (n, p) in enumerate(tiny_llama.adapters.items())]
    prompts = [list(range(3, 3 + n)) for n in (37, 5, 23, 61, 2, 14)]
    loras = [reqs[0], None, reqs[1], reqs[3], reqs[2], None]
    whole, chunked = _engine(tiny_llama), _engine(tiny_llama, max_num_batched_tokens=7)
    lw, lc = _capture(whole), _capture(chunked)
    calls = _count_prefill_chunks(chunked)
    a = whole.generate(prompts, GREEDY, loras, use_tqdm=False)
    b = chunked.generate(prompts, GREEDY, loras, use_tqdm=False)
    assert max(sum(c) for c in calls) <= 7 and len(calls) >= sum(map(len, prompts)) // 7
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        torch.testing.assert_close(torch.stack(lc[y.request_id]), torch.stack(lw[x.request_id]),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mixed", [True, False])
def test_long_prompt_does_not_block_running_decodes(tiny_llama, mixed):
    eng = _engine(tiny_llama, max_num_batched_tokens=8, mixed_steps=mixed)
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    eng.add_request("a", [5, 6, 7], sp)
    eng.add_request("b", [8, 9], sp)
    eng.step()                                  # their prefill
    seqs = {s.request_id: s for s in eng.scheduler.running}
    eng.add_request("long", list(range(10, 74)), SamplingParams(max_tokens=2, temperature=0.0))
    long_seq = eng._seqs["long"]
    calls = _count_prefill_chunks(eng)
    steps = 0
    while long_seq.prefilling or long_seq.num_computed_tokens == 0:
        eng.step()
        steps += 1
    assert long_seq.num_computed_tokens == 64
    if mixed:
        # each step decodes a and b and prefills 8 - 2 = 6 prompt tokens: 11 steps
        assert calls == [[6]] * 10 + [[4]]
        assert steps == 11
        assert len(seqs["a"].output_token_ids) == len(seqs["b"].output_token_ids) == 1 + 11
        stats = eng.cache_stats()["steps"]["prefill"]
        assert stats["mixed"] == 11 and stats["rows"] == 22
    else:
        # 64 prompt tokens in chunks of 8 = 8 prefill steps, each after a decode step of the
        # others (the step right after their own prefill is a decode)
        assert calls == [[8]] * 8
        assert steps == 16
        assert len(seqs["a"].output_token_ids) == len(seqs["b"].output_token_ids) == 1 + 8


def test_chunked_prefill_output_equals_unchunked_with_sequences_decoding(tiny_llama):
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = []
    for budget in (4096, 6):
        eng = _engine(tiny_llama, max_num_batched_tokens=budget)
        eng.add_request("a", [5, 6, 7], sp)
        eng.step()
        eng.add_request("long", list(range(10, 50)), sp)
        done = {}
        while eng.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].token_ids for o in eng.step()})
        outs.append(done)
    assert outs[0] == outs[1]


def _slow_loader(eng):
    """Make adapter loads wait for ``gate`` (a threading.Event) in the background thread."""
    gate, orig = threading.Event(), eng.loras._load

    def load(req):
        assert gate.wait(10)
        return orig(req)
    eng.loras._load = load
    return gate


def test_cold_adapter_loads_while_the_batch_keeps_decoding(tiny_llama):
    eng = _engine(tiny_llama, num_scheduler_steps=1)   # a token per step() call
    gate = _slow_loader(eng)
    sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    eng.add_request("base", [5, 6, 7], sp)
    eng.step()
    cold = LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"]))
    eng.add_request("cold", [9, 10], GREEDY, cold)   # returns at once: the load is queued
    assert eng.loras.loading()
    base = eng._seqs["base"]
    for _ in range(5):
        eng.step()
    assert len(base.output_token_ids) == 6          # decoded every step meanwhile
    assert eng._seqs["cold"].status.value == "waiting"
    gate.set()
    outs = {}
    while "cold" not in outs:
        outs.update({o.request_id: o for o in eng.step()})
    assert outs["cold"].outputs[0].finish_reason == "length"
    assert eng.cache_stats()["cpu"]["misses"] == 1
    # the same tokens as an engine that had the adapter loaded up front
    ref = _engine(tiny_llama).generate([[9, 10]], GREEDY, cold, use_tqdm=False)[0]
    assert outs["cold"].outputs[0].token_ids == ref.outputs[0].token_ids


def test_steps_idle_on_a_load_are_counted_as_load_waits(tiny_llama):
    """cache_stats()["steps"]["load_wait"]: the step() calls that ran nothing because the only
    requests waited for their adapter's load, and the time they waited (the benchmarks' part
    of a run lost to cold loads); none while other rows decode."""
    eng = _engine(tiny_llama, num_scheduler_steps=1)
    gate = _slow_loader(eng)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    eng.add_request("base", [5, 6, 7], sp)
    cold = LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"]))
    eng.add_request("cold", [9, 10], GREEDY, cold)
    for _ in range(3):
        eng.step()                                   # the base row decodes: no wait
    assert eng.cache_stats()["steps"]["load_wait"] == {"steps": 0, "seconds": 0.0}
    done: set = set()
    while "base" not in done:
        done.update(o.request_id for o in eng.step())
    t0 = time.perf_counter()
    for _ in range(3):
        assert eng.step() == []                      # only the cold request is left
    idle = time.perf_counter() - t0
    wait = eng.cache_stats()["steps"]["load_wait"]
    assert wait["steps"] == 3 and 0.1 <= wait["seconds"] <= idle
    gate.set()
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.cache_stats()["steps"]["load_wait"]["steps"] >= 3


def test_background_load_error_fails_only_its_request(tiny_llama, adapter):
    eng = _engine(tiny_llama)
    cfg = adapter / "adapter_config.json"
    cfg.write_text(cfg.read_text().replace('"use_dora": false', '"use_dora": true'))
    bad = LoRARequest("dora", 7, str(adapter))
    good = LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"]))
    eng.add_request("ok-base", [5, 6], GREEDY)
    eng.add_request("bad", [5, 6], GREEDY, bad)
    eng.add_request("ok-lora", [5, 6], GREEDY, good)
    outs = {}
    while eng.has_unfinished_requests():
        outs.update({o.request_id: o for o in eng.step()})
    assert outs["bad"].finished and outs["bad"].outputs[0].finish_reason == "error"
    assert "dora" in outs["bad"].error.lower() and outs["bad"].outputs[0].token_ids == []
    for rid in ("ok-base", "ok-lora"):
        assert outs[rid].error is None and len(outs[rid].outputs[0].token_ids) == 6
    assert 7 not in eng.list_loras()["cpu"]


@pytest.fixture()
def adapter(tiny_llama, tmp_path):
    import shutil

    dst = tmp_path / "dora"
    shutil.copytree(tiny_llama.adapters["qv_r8"], dst)
    text = (dst / "adapter_config.json").read_text()
    assert '"use_dora": false' in text
    return dst


# ---- aging ---------------------------------------------------------------------------------
def _seq(rid, lora_id):
    lora = LoRARequest(f"a{lora_id}", lora_id, f"/adapters/{lora_id}") if lora_id else None
    return Sequence(rid, None, [1, 2, 3], SamplingParams(max_tokens=4), lora, RequestMetrics(0.0))


def _simulate(max_bypass, steps=200):
    """max_loras=1, 4 rows. A steady stream of adapter-1 sequences (each decodes 3 steps) and
    one adapter-2 sequence waiting from the start. Returns the step it is admitted (or None)."""
    sch = Scheduler(max_num_seqs=4, max_loras=1, blocks=BlockManager(64, 16), max_bypass=max_bypass)
    sch.add(_seq("first", 1))
    waiter = _seq("waiter", 2)
    sch.add(waiter)
    age = {}
    for step in range(steps):
        sch.add(_seq(f"s{step}", 1))
        plan = sch.schedule()
        if waiter in plan.seqs:
            return step
        advance(sch, plan, age, 3)
    return None


def test_aging_admits_a_waiter_under_a_stream_of_resident_adapters():
    assert _simulate(max_bypass=10**9) is None     # without aging it would wait forever
    step = _simulate(max_bypass=4)
    assert step is not None and step < 30


def test_an_aged_waiter_drains_one_adapter_while_the_others_keep_admitting():
    """max_loras=2, 8 rows: adapters 1 and 3 run; a waiter for adapter 2 ages under a
    stream of requests for 1 and 3. Then one of them (the one with fewer rows) admits nobody
    more and the waiter gets its slot once that adapter's rows end, while the other goes on
    admitting; no request for a new adapter 4 overtakes the waiter meanwhile."""
    sch = Scheduler(max_num_seqs=8, max_loras=2, blocks=BlockManager(256, 16), max_bypass=3)
    for i in range(5):
        sch.add(_seq(f"one{i}", 1))
    sch.add(_seq("three", 3))
    waiter = _seq("waiter", 2)
    sch.add(waiter)
    life = {}   # rows end after 4 steps, adapter 3 rows after 16
    admitted_after_aging = []
    for step in range(40):
        sch.add(_seq(f"s{step}", 1 if step % 2 else 3))
        if step == 5:
            sch.add(_seq("other", 4))   # a new adapter behind the waiter
            sch.add(_seq("base", None))  # no adapter: needs no slot
        aged = waiter.bypassed >= 3
        plan = sch.schedule()
        if waiter in plan.seqs:
            break
        if aged:
            admitted_after_aging += plan.prefilled
        for s in plan.seqs:
            if plan.prefill:
                s.num_computed_tokens = len(s.prompt_token_ids)
            life[s] = life.get(s, 0) + 1
            if life[s] >= (16 if s.lora_id == 3 else 4):
                sch.finish(s)
    else:
        raise AssertionError("the waiter never got a slot")
    assert step < 12
    # after aging the other adapter went on admitting (the old rule admitted nobody), and
    # only it: the one with fewer rows drained
    assert len({s.lora_id for s in admitted_after_aging} - {None}) == 1
    assert not any(s.request_id == "other" for s in sch.running)   # it did not overtake
    assert "base" in [s.request_id for s in admitted_after_aging]  # base rows go on


def test_many_adapters_over_few_slots_keep_the_batch_full():
    """800 requests over 60 adapters of Zipf popularity, 8 slots, 64 rows (a bulk night in
    miniature): aging drains one slot at a time instead of stopping admission, so the batch
    stays mostly full (the rule that admitted nobody behind an aged waiter averaged 17 rows
    of 64 here, in 1,018 steps) and every request still runs."""
    import random
    import statistics

    rng = random.Random(0)
    weights = [1 / (k + 1) ** 1.1 for k in range(60)]
    sch = Scheduler(max_num_seqs=64, max_loras=8, blocks=BlockManager(2048, 16))
    seqs = [_seq(f"r{i}", rng.choices(range(1, 61), weights)[0]) for i in range(800)]
    length = {s: rng.randint(5, 40) for s in seqs}
    for s in seqs:
        sch.add(s)
    life, rows, steps = {}, [], 0
    while sch.has_unfinished() and steps < 2000:
        plan = sch.schedule()
        steps += 1
        rows.append(len(sch.running))
        for s in plan.seqs:
            if plan.prefill:
                s.num_computed_tokens = len(s.prompt_token_ids)
            life[s] = life.get(s, 0) + 1
            if life[s] >= length[s]:
                sch.finish(s)
    assert all(s in life for s in seqs) and not sch.has_unfinished()
    assert statistics.mean(rows) >= 0.6 * 64 and steps < 500


def test_loader_thread_allocates_staging_only_outside_graph_replays(tiny_llama):
    """The loader takes the lock the runner holds around graph replays/captures: a pinned
    allocation from that thread would invalidate a CUDA graph capture in progress."""
    eng = _engine(tiny_llama)
    lock = eng.loras.gpu.layout.pin_lock
    req = LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"]))
    with lock:  # as during a replay or capture
        eng.loras.prefetch(req)
        fut = eng.loras.pending[1][1]
        with pytest.raises(TimeoutError):
            fut.result(timeout=0.5)
    fut.result(timeout=10)
    assert eng.loras.poll() == [] and eng.loras.ready(req)


def test_the_loader_gets_the_gil_often_while_loads_are_pending(tiny_llama):
    """While adapters load in the background, the engine's thread hands the GIL over every
    LOAD_SWITCH_INTERVAL (each torch call of a load needs it back); once the last load ends
    the process's own interval is back, also when nobody polls (a request aborted, an adapter
    removed while loading)."""
    import sys
    import time

    from lorry.engine.lora.manager import LOAD_SWITCH_INTERVAL

    def back_to(value):
        deadline = time.monotonic() + 10
        while sys.getswitchinterval() != value and time.monotonic() < deadline:
            time.sleep(0.01)
        return sys.getswitchinterval() == value

    before = sys.getswitchinterval()
    sys.setswitchinterval(0.005)   # Python's default, whatever ran before in this process
    try:
        eng = _engine(tiny_llama)
        lock = eng.loras.gpu.layout.pin_lock
        with lock:   # hold the loads at their staging allocation
            eng.loras.prefetch(LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"])))
            eng.loras.prefetch(LoRARequest("mlp_r16", 2, str(tiny_llama.adapters["mlp_r16"])))
            assert sys.getswitchinterval() == LOAD_SWITCH_INTERVAL
            assert eng.loras.poll() == [] and sys.getswitchinterval() == LOAD_SWITCH_INTERVAL
        assert back_to(0.005)          # both loads ended; nobody polled yet
        assert eng.loras.poll() == [] and not eng.loras.pending
        # a request whose adapter is still loading is aborted, and nothing polls again
        with lock:
            eng.add_request("r", [5, 6], SamplingParams(max_tokens=2),
                            LoRARequest("pattern", 3, str(tiny_llama.adapters["pattern"])))
            assert sys.getswitchinterval() == LOAD_SWITCH_INTERVAL
            eng.abort_request("r")
        assert back_to(0.005)
        eng.loras.close()
    finally:
        sys.setswitchinterval(before)


def test_aging_does_not_stall_others_when_pins_leave_the_waiter_no_slot():
    """max_loras=1 with adapter 1 pinned: a waiter for adapter 2 can never run until an unpin;
    the aging rule must not hold back the requests behind it (base, pinned adapter)."""
    sch = Scheduler(max_num_seqs=4, max_loras=1, blocks=BlockManager(64, 16), max_bypass=2)
    waiter = _seq("waiter", 2)
    sch.add(waiter)
    admitted = []
    for step in range(12):
        sch.add(_seq(f"s{step}", 1 if step % 2 else None))
        plan = sch.schedule(pinned={1})
        assert waiter not in plan.seqs
        for s in plan.seqs:
            if plan.prefill:
                admitted.append(s.request_id)
                s.num_computed_tokens = len(s.prompt_token_ids)
            sch.finish(s)  # one step each: rows free up at once
    assert len(admitted) == 12 and waiter.bypassed >= 2
    plan = sch.schedule(pinned=set())                       # unpinned: its turn comes
    assert waiter in plan.seqs


def test_waiters_that_cannot_fit_a_slot_start_no_adapter_load():
    sch = Scheduler(max_num_seqs=4, max_loras=1, blocks=BlockManager(64, 16))
    running = _seq("running", 1)
    sch.add(running)
    asked = []

    def ready(seq):
        asked.append(seq.request_id)
        return True
    sch.schedule(ready=ready)                               # admits "running" (adapter 1)
    sch.add(_seq("other", 2))                               # no slot while adapter 1 runs
    asked.clear()
    plan = sch.schedule(ready=ready)
    assert "other" not in [s.request_id for s in plan.seqs] and asked == []


@pytest.mark.parametrize("aged", [False, True])
def test_an_aged_waiter_keeps_its_slot_while_its_adapter_loads(aged):
    """A free slot, a waiter for adapter 2 whose load is still running, and a later waiter
    for adapter 3 that is ready: the later one takes the slot, unless the first one has aged
    (then the slot waits for its load)."""
    sch = Scheduler(max_num_seqs=4, max_loras=2, blocks=BlockManager(64, 16), max_bypass=3)
    sch.add(_seq("running", 1))
    sch.schedule()
    waiter, later = _seq("waiter", 2), _seq("later", 3)
    waiter.bypassed = 3 if aged else 0
    sch.add(waiter)
    sch.add(later)
    plan = sch.schedule(ready=lambda s: s is not waiter)
    assert ("later" in [s.request_id for s in plan.seqs]) is not aged
    assert waiter not in plan.seqs


def test_refused_request_starts_no_background_load(tiny_llama):
    from lorry.engine.errors import ModelLengthError
    eng = _engine(tiny_llama)
    req = LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"]))
    with pytest.raises(ModelLengthError):
        eng.add_request("too-long", [5] * 200, GREEDY, req)
    assert not eng.loras.loading() and not eng.loras.ready(req)
    assert not eng.has_unfinished_requests()
    assert eng.loras.background_loads == 0
    eng.add_request("ok", [5, 6, 7], GREEDY, req)               # accepted: loads in the back
    assert eng.loras.background_loads == 1
    eng.abort_request("ok")


def test_an_id_given_new_files_serves_the_new_weights(tiny_llama):
    """The same lora_int_id with another path: once the old requests are done, the engine drops
    the old CPU and GPU copies, so the new files' weights serve (as an engine that only ever
    saw them); while old requests run, the switch is refused with a clear error."""
    prompt = [[5, 9, 33, 7, 81]]
    old = LoRARequest("x", 1, str(tiny_llama.adapters["all_r4_rslora"]))
    new = LoRARequest("x", 1, str(tiny_llama.adapters["pattern"]))
    eng = _engine(tiny_llama)
    first = eng.generate(prompt, GREEDY, [old], use_tqdm=False)[0].outputs[0].token_ids
    eng.add_request("running", prompt[0], GREEDY, old)
    with pytest.raises(ValueError, match="cannot switch to"):
        eng.add_request("switch", prompt[0], GREEDY, new)
    eng.abort_request("running")
    got = eng.generate(prompt, GREEDY, [new], use_tqdm=False)[0].outputs[0].token_ids
    want = _engine(tiny_llama).generate(prompt, GREEDY, [new], use_tqdm=False)[0].outputs[0].token_ids
    assert got == want and got != first


@pytest.mark.parametrize(("rows", "chunks", "decodes"), [(3, [[3]] * 6, 6), (4, [[6]] * 3, 3),
                                                         (7, [[6]] * 3, 3)])
def test_decode_rows_filling_the_budget_do_not_starve_prompts(tiny_llama, rows, chunks,
                                                              decodes):
    """Decoding rows that leave a prompt half of max_num_batched_tokens (6) share each step
    with it; more rows than that would leave it less than alternation gives it, so prompts
    get steps of their own (the whole budget), alternating with the rows' decode steps."""
    eng = _engine(tiny_llama, max_num_batched_tokens=6)
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i in range(rows):
        eng.add_request(f"r{i}", [5 + i, 6], sp)
    while any(s.prefilling or not s.output_token_ids for s in eng._seqs.values()):
        eng.step()                                        # the rows decode from now on
    eng.add_request("late", list(range(10, 28)), SamplingParams(max_tokens=1, temperature=0.0))
    seqs = [eng._seqs[f"r{i}"] for i in range(rows)]
    before = [len(s.output_token_ids) for s in seqs]
    calls = _count_prefill_chunks(eng)
    done = []
    for _ in range(6):
        done += [o.request_id for o in eng.step()]
    assert calls == chunks and done == ["late"]          # its 18 prompt tokens in 6 steps
    assert [len(s.output_token_ids) - n for s, n in zip(seqs, before)] == [decodes] * rows
