"""prefill_min_tokens: new prompts wait in decode rounds until the free rows would take enough
prompt tokens (or prefill_max_wait device steps), so that fewer, larger prompt steps run."""
from __future__ import annotations

import pytest

from lorry.engine import EngineConfig, LLMEngine, SamplingParams
from lorry.engine.kv_cache import BlockManager
from lorry.engine.outputs import RequestMetrics
from lorry.engine.scheduler import Scheduler
from lorry.engine.sequence import Sequence, SequenceStatus


def _seq(rid: str, prompt_len: int, max_tokens: int) -> Sequence:
    return Sequence(rid, None, list(range(1, prompt_len + 1)),
                    SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                    None, RequestMetrics(0.0))


def _step(sch: Scheduler, plan) -> None:
    """What the engine does with a plan: prompts computed, a token per row per device step,
    rows ended at max_tokens."""
    for s, n in zip(plan.prefilled, plan.chunks):
        s.num_computed_tokens += n
    for _ in range(plan.steps):
        for s in plan.seqs:
            if s.status is SequenceStatus.RUNNING and not s.prefilling:
                s.output_token_ids.append(7)
                if len(s.output_token_ids) >= s.params.max_tokens:
                    sch.finish(s)


def _full_batch(min_tokens: int, max_wait: int, rows: int = 8) -> Scheduler:
    """``rows`` rows decoding (one ends after 2 tokens, the others run long), plus waiters of
    30 prompt tokens each."""
    sch = Scheduler(max_num_seqs=rows, max_loras=1, blocks=BlockManager(512, 16),
                    num_steps=4, prefill_min_tokens=min_tokens, prefill_max_wait=max_wait)
    sch.add(_seq("short", 5, 2))
    for i in range(rows - 1):
        sch.add(_seq(f"long{i}", 5, 500))
    _step(sch, sch.schedule())              # every row admitted and prefilled
    assert len(sch.running) == rows
    for i in range(10):
        sch.add(_seq(f"w{i}", 30, 500))
    return sch


def _until_admitted(sch: Scheduler, limit: int = 50) -> tuple[int, int]:
    """Steps run until a waiter is admitted -> (device steps decoded before it, plans)."""
    device_steps = plans = 0
    while plans < limit:
        plan = sch.schedule()
        plans += 1
        if plan.prefilled:
            return device_steps, plans
        device_steps += plan.steps
        _step(sch, plan)
    raise AssertionError("no waiter was admitted")


def test_without_the_setting_a_freed_row_is_refilled_at_the_next_step():
    sch = _full_batch(0, 32)
    decoded, _ = _until_admitted(sch)
    assert decoded <= 4          # the round the short row ends in; its row is taken next
    assert sch.held_rounds == 0


def test_one_free_row_of_too_few_tokens_waits_at_most_max_wait_device_steps():
    sch = _full_batch(100, 16)
    decoded, plans = _until_admitted(sch)
    # one row is free after 2 tokens; 30 tokens < 100, so the waiters are held in rounds of
    # 4 device steps until 16 device steps have passed, then admitted anyway
    assert 16 <= decoded <= 4 + 16 + 4
    assert sch.held_rounds >= 4 and plans > sch.held_rounds


def test_enough_free_rows_release_the_waiters_at_once():
    sch = _full_batch(60, 10**6)
    # two rows end together: 2 x 30 tokens reach the threshold of 60
    sch.running[1].params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    decoded, _ = _until_admitted(sch)
    assert decoded <= 2
    admitted = [s for s in sch.running if s.request_id.startswith("w")]
    assert len(admitted) == 2


def test_a_batch_less_than_half_full_is_never_held():
    sch = Scheduler(max_num_seqs=8, max_loras=1, blocks=BlockManager(512, 16), num_steps=4,
                    prefill_min_tokens=10**6, prefill_max_wait=10**6)
    for i in range(3):
        sch.add(_seq(f"r{i}", 5, 500))
    _step(sch, sch.schedule())
    sch.add(_seq("late", 5, 500))
    plan = sch.schedule()
    assert [s.request_id for s in plan.prefilled] == ["late"] and sch.held_rounds == 0


def test_a_prompt_part_way_through_its_prefill_lets_new_prompts_ride_along():
    """Holding saves a prompt step; while one prompt is being prefilled in chunks there is a
    prompt step anyway, so waiters join it."""
    def run(first_long: bool):
        sch = Scheduler(max_num_seqs=4, max_loras=1, blocks=BlockManager(512, 16),
                        num_steps=4, max_num_batched_tokens=80, prefill_min_tokens=10**6,
                        prefill_max_wait=10**6)
        for i in range(2):
            sch.add(_seq(f"r{i}", 5, 500))
        sch.add(_seq("long", 100 if first_long else 5, 500))
        _step(sch, sch.schedule())
        sch.add(_seq("small", 5, 500))
        sch.add(_seq("small2", 5, 500))     # more waiters than free rows: a backlog
        plan = sch.schedule()
        return [(s.request_id, n) for s, n in zip(plan.prefilled, plan.chunks)], sch

    chunked, sch = run(True)
    assert chunked == [("long", 30), ("small", 5)] and sch.held_rounds == 0
    whole, sch = run(False)            # nothing being prefilled: "small" is held
    assert whole == [] and sch.held_rounds == 1


def test_the_wait_is_bounded_by_max_wait_whatever_the_round_length():
    for max_wait in (1, 5, 10):
        sch = _full_batch(10**6, max_wait)
        decoded, _ = _until_admitted(sch)
        # the short row ends inside the first 4-step round; then at most max_wait steps held
        assert decoded <= 4 + max_wait, (max_wait, decoded)
        assert sch._held_steps == 0            # reset by the admission


def test_a_preempted_rows_recompute_is_never_held():
    sch = _full_batch(10**6, 10**6)
    victim = sch.running[-1]
    victim.output_token_ids.extend([7] * 5)
    sch.preempt(victim)                        # back at the head of the queue, tokens kept
    plan = sch.schedule()
    assert victim in plan.prefilled and sch.held_rounds == 0


def test_no_hold_when_the_free_rows_take_every_waiter():
    sch = _full_batch(10**6, 10**6)
    while len(sch.waiting) > 1:                # the end of a run: one waiter left
        sch.finish(sch.waiting[-1])
    decoded, _ = _until_admitted(sch)
    assert decoded <= 4 and sch.held_rounds == 0


def test_aborted_waiters_leave_no_held_steps_behind():
    sch = _full_batch(10**6, 16)
    for _ in range(3):                         # 3 rounds held (12 steps of the 16)
        _step(sch, sch.schedule())
    assert sch._held_steps >= 8
    while sch.waiting:                         # every waiter aborted
        sch.finish(sch.waiting[0])
    _step(sch, sch.schedule())
    assert sch._held_steps == 0                # a later backlog gets its whole wait


def test_the_threshold_never_asks_more_than_a_step_can_take():
    # a budget of 40 leaves 34 prompt tokens beside the 6 rows still decoding once the two
    # short ones end: their two 30-token successors (60) release the hold although
    # prefill_min_tokens asks for 10**6
    sch = Scheduler(max_num_seqs=8, max_loras=1, blocks=BlockManager(512, 16), num_steps=4,
                    max_num_batched_tokens=40, prefill_min_tokens=10**6,
                    prefill_max_wait=10**6)
    for i in range(6):
        sch.add(_seq(f"long{i}", 5, 500))
    sch.add(_seq("short0", 5, 2))
    sch.add(_seq("short1", 5, 2))
    while sch.waiting:
        _step(sch, sch.schedule())
    for i in range(5):
        sch.add(_seq(f"w{i}", 30, 500))
    decoded, _ = _until_admitted(sch)
    assert decoded <= 4 and sch.held_rounds == 0


def test_a_step_that_preempts_is_not_counted_as_held():
    """A pool too short for the rows' next tokens preempts, and that step admits nobody
    whatever the hold: it spends none of a hold's wait."""
    sch = Scheduler(max_num_seqs=4, max_loras=1, blocks=BlockManager(6, 16), num_steps=1,
                    prefill_min_tokens=10**6, prefill_max_wait=10**6)
    for i in range(4):
        sch.add(_seq(f"r{i}", 15, 500))      # a block each: the pool all but full
    _step(sch, sch.schedule())
    for i in range(3):
        sch.add(_seq(f"w{i}", 5, 500))
    _step(sch, sch.schedule())                 # the rows' 16th tokens fit their blocks
    plan = sch.schedule()                      # the 17th need blocks: two rows preempted
    assert sch.preemptions > 0 and not plan.prefilled
    assert sch.held_rounds == 0 and sch._held_steps == 0


@pytest.mark.parametrize("kw", [{"mixed": False}, {"prefill_max_wait": 0}])
def test_alternating_steps_or_no_wait_mean_no_hold(kw):
    sch = Scheduler(max_num_seqs=8, max_loras=1, blocks=BlockManager(512, 16), num_steps=4,
                    **{"prefill_min_tokens": 10**6, "prefill_max_wait": 32, **kw})
    assert sch.prefill_min_tokens == 0
    sch.add(_seq("short", 5, 2))
    for i in range(7):
        sch.add(_seq(f"long{i}", 5, 500))
    for i in range(10):
        sch.add(_seq(f"w{i}", 30, 500))
    plans = 0
    while not any(s.request_id.startswith("w") for s in sch.running) and plans < 20:
        _step(sch, sch.schedule())
        plans += 1
    assert plans < 8 and sch.held_rounds == 0


@pytest.fixture
def engines(tiny_llama):
    def make(**kw):
        return LLMEngine(EngineConfig(model=str(tiny_llama.dir), device="cpu", max_loras=2,
                                      max_num_seqs=4, max_model_len=128,
                                      num_scheduler_steps=4, **kw))
    return make


def test_holding_prompts_changes_no_token_and_runs_fewer_prompt_steps(engines):
    prompts = [list(range(3 + i, 3 + i + n)) for i, n in enumerate(
        (9, 4, 17, 6, 11, 3, 8, 14, 5, 12, 7, 10))]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
              for m in (3, 9, 5, 12, 4, 7, 10, 6, 8, 5, 11, 4)]
    plain, held = engines(prefill_min_tokens=0), engines(prefill_min_tokens=20, prefill_max_wait=8)
    a = plain.generate(prompts, params, use_tqdm=False, order="input")
    b = held.generate(prompts, params, use_tqdm=False, order="input")
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert all(len(o.outputs[0].token_ids) == p.max_tokens for o, p in zip(b, params))
    stats_a, stats_b = plain.cache_stats(), held.cache_stats()
    assert stats_a["kv"]["held_rounds"] == 0 and stats_b["kv"]["held_rounds"] > 0
    assert stats_b["steps"]["prefill"]["steps"] < stats_a["steps"]["prefill"]["steps"]


@pytest.mark.parametrize("name", ["prefill_min_tokens", "prefill_max_wait"])
@pytest.mark.parametrize("value", [-1, 1.5, True, "8"])
def test_config_refuses_a_bad_hold_setting(tiny_llama, name, value):
    with pytest.raises(ValueError, match=name):
        EngineConfig(model=str(tiny_llama.dir), **{name: value})


def test_the_default_holds_on_cuda_only(tiny_llama, engines):
    import torch

    from lorry.engine.setup import CUDA_PREFILL_MIN_TOKENS, prefill_min_tokens

    cfg = EngineConfig(model=str(tiny_llama.dir))
    assert cfg.prefill_min_tokens is None
    assert prefill_min_tokens(cfg, torch.device("cuda")) == CUDA_PREFILL_MIN_TOKENS > 0
    assert prefill_min_tokens(cfg, torch.device("cpu")) == 0
    set_ = EngineConfig(model=str(tiny_llama.dir), prefill_min_tokens=7)
    assert prefill_min_tokens(set_, torch.device("cuda")) == 7
    assert engines().info()["prefill_min_tokens"] == 0       # this CPU engine: off
    assert engines(prefill_min_tokens=20).info()["prefill_min_tokens"] == 20
