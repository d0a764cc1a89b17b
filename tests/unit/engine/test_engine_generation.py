"""Generation behaviour a user sees: sampling, seeds, stops, chat prompts, limits, step API."""
from __future__ import annotations

import json
import shutil

import pytest

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.engine.errors import ModelLengthError


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=2, max_lora_rank=16,
                                  max_num_seqs=4, max_model_len=64))


def _ids(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7,
                        ignore_eos=True)
    alone = engine.generate("sample me", sp, use_tqdm=False)
    other = SamplingParams(max_tokens=8, temperature=1.0, seed=1, ignore_eos=True)
    mixed = engine.generate(["zz", "sample me", "q"], [other, sp, other], use_tqdm=False)
    assert _ids(alone)[0] == _ids(mixed)[1]
    different = engine.generate("sample me", SamplingParams(max_tokens=8, seed=8,
                                                            ignore_eos=True), use_tqdm=False)
    assert _ids(different) != _ids(alone)


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate("abc", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                             use_tqdm=False)
    k1 = engine.generate("abc", SamplingParams(max_tokens=6, temperature=1.5, top_k=1, seed=3,
                                               ignore_eos=True), use_tqdm=False)
    assert _ids(greedy) == _ids(k1)


def test_stop_token_ids_and_stop_strings(engine):
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    full = engine.generate("stop test", sp, use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    out = engine.generate("stop test", SamplingParams(max_tokens=12, temperature=0,
                                                      ignore_eos=True, stop_token_ids=[stop_id]),
                          use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[:first + 1]
    text = full.text
    stop = next(text[i:i + 2] for i in range(2, len(text) - 1) if text[i:i + 2].isprintable())
    out = engine.generate("stop test", SamplingParams(max_tokens=12, temperature=0,
                                                      ignore_eos=True, stop=[stop]),
                          use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.text == text[:text.find(stop)]
    assert stop not in out.text


def test_eos_stops_unless_ignored(engine, monkeypatch):
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ids = engine.generate("e", sp, use_tqdm=False)[0].outputs[0].token_ids
    # declare the first greedy token the tokenizer's EOS: generation must stop right there
    monkeypatch.setattr(engine.tokenizer, "eos_token_ids", frozenset({ids[0]}))
    out = engine.generate("e", SamplingParams(max_tokens=6, temperature=0), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].token_ids == ids[:1]
    assert out.outputs[0].text == ""
    again = engine.generate("e", sp, use_tqdm=False)[0].outputs[0]
    assert again.token_ids == ids and again.finish_reason == "length"


def test_prompts_as_text_ids_and_chat_messages(engine):
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    messages = [{"role": "user", "content": "hi"}]
    _text_out, chat_out = engine.generate(["<|user|>\nhi</s>\n<|assistant|>\n", messages], sp,
                                         use_tqdm=False)
    expected = engine.tokenizer.hf.apply_chat_template(messages, tokenize=False,
                                                       add_generation_prompt=True)
    assert chat_out.prompt == expected
    ids_out = engine.generate([chat_out.prompt_token_ids], sp, use_tqdm=False)[0]
    assert ids_out.outputs[0].token_ids == chat_out.outputs[0].token_ids
    assert ids_out.prompt is None
    assert chat_out.usage == {"prompt_tokens": len(chat_out.prompt_token_ids),
                              "completion_tokens": 3,
                              "total_tokens": len(chat_out.prompt_token_ids) + 3,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    with pytest.raises(ValueError, match="chat message"):
        engine.generate([[{"role": "user"}]], sp, use_tqdm=False)


def test_max_model_len(engine):
    with pytest.raises(ModelLengthError, match="max_model_len=64"):
        engine.generate([list(range(3, 70))], SamplingParams(max_tokens=2), use_tqdm=False)
    out = engine.generate([list(range(3, 60))], SamplingParams(max_tokens=50, ignore_eos=True),
                          use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 7
    assert not engine.has_unfinished_requests()


def test_step_api_abort_and_outputs(engine, tiny_llama):
    lora = LoRARequest("qv", 1, str(tiny_llama.adapters["qv_r8"]))
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    engine.add_lora(lora)  # warm: a cold adapter would load in the background while b runs
    engine.add_request("a", "first", sp, lora)
    engine.add_request("b", "second", SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", "dup", sp)
    assert engine.num_unfinished_requests() == 2
    done = []
    while not done:
        done = engine.step()
    assert [o.request_id for o in done] == ["b"] and done[0].finished
    aborted = engine.abort_request("a")
    assert aborted.outputs[0].finish_reason == "abort" and aborted.lora_request == lora
    assert 0 < len(aborted.outputs[0].token_ids) < 20
    assert engine.abort_request("a") is None and not engine.has_unfinished_requests()
    m = done[0].metrics
    assert m.arrival_time <= m.first_token_time <= m.finished_time


@pytest.mark.parametrize("order", ["longest_first", "input"])
def test_generate_admits_the_longest_answers_first_and_returns_input_order(engine, order):
    """4 rows, 6 requests: by default the 4 longest answers take the rows first (a batch
    that ends on one long row wastes the others); order="input" is first come, first served.
    Either way the outputs come back in input order, with the same greedy tokens."""
    lengths = [2, 9, 4, 12, 3, 7]
    prompts = [f"request {i}" for i in range(len(lengths))]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in lengths]
    outs = engine.generate(prompts, params, use_tqdm=False, order=order)
    assert [o.prompt for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths
    started = [o.metrics.first_scheduled_time for o in outs]
    first = {3, 1, 5, 2} if order == "longest_first" else {0, 1, 2, 3}   # of max_num_seqs=4
    assert max(started[i] for i in first) < min(started[i] for i in set(range(6)) - first)
    alone = [engine.generate(p, sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    assert _ids(outs) == _ids(alone)
    # a refused prompt amid the reordered submissions leaves nothing of the call queued
    with pytest.raises(ModelLengthError):
        engine.generate(["a", [5] * 100, "b"], [params[1], params[0], params[3]],
                        use_tqdm=False, order=order)
    assert not engine.has_unfinished_requests()


def test_generate_argument_errors(engine):
    with pytest.raises(ValueError, match="order must be one of"):
        engine.generate(["a"], SamplingParams(), use_tqdm=False, order="shortest")
    with pytest.raises(ValueError, match="2 prompts, 3 sampling params"):
        engine.generate(["a", "b"], [SamplingParams()] * 3, use_tqdm=False)
    with pytest.raises(ValueError, match="prompt"):
        engine.generate([[]], SamplingParams(), use_tqdm=False)
    with pytest.raises(ValueError, match=r"\[0, 259\)"):
        engine.generate([[5, 999]], SamplingParams(), use_tqdm=False)


def test_info(engine):
    info = engine.info()
    assert info["lora_backend"] == "torch" and info["device"] == "cpu"
    assert info["dtype"] == "float32" and info["max_model_len"] == 64


def test_a_prompt_of_no_tokens_is_refused_and_later_steps_run(tiny_llama, tmp_path):
    """A tokenizer that adds no BOS (SmolLM2's, Qwen's) encodes "" to no tokens: add_request
    refuses that prompt (as vLLM does), so no step fails on it and other requests run."""
    tok = tmp_path / "tokenizer"
    tok.mkdir()
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_llama.dir / name, tok / name)
    spec = json.loads((tiny_llama.dir / "tokenizer.json").read_text())
    spec["post_processor"] = None   # no BOS
    (tok / "tokenizer.json").write_text(json.dumps(spec))
    eng = LLMEngine(EngineConfig(model=str(tiny_llama.dir), tokenizer=str(tok), max_loras=1,
                                 max_num_seqs=2, max_model_len=64))
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    with pytest.raises(ValueError, match="'empty' has no tokens"):
        eng.add_request("empty", "", sp)
    assert not eng.has_unfinished_requests()
    with pytest.raises(ValueError, match="has no tokens"):
        eng.generate(["hi", ""], sp, use_tqdm=False)
    eng.add_request("hi", "hi", sp)
    done = []
    while eng.has_unfinished_requests():
        done += eng.step()
    assert [len(o.outputs[0].token_ids) for o in done] == [2]


def test_generate_leaves_requests_added_under_any_id_alone(tiny_llama):
    """generate() names its own requests: one added through add_request under a name like
    theirs neither makes generate() fail nor is dropped by it."""
    eng = LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_loras=1, max_num_seqs=4,
                                 max_model_len=64))
    eng.add_request("gen-0", "mine", SamplingParams(max_tokens=30, temperature=0,
                                                    ignore_eos=True))
    outs = eng.generate(["a", "b"], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 2]
    assert "gen-0" not in {o.request_id for o in outs}
    assert eng.num_unfinished_requests() == 1
    done = []
    while eng.has_unfinished_requests():
        done += eng.step()
    assert [(o.request_id, len(o.outputs[0].token_ids)) for o in done] == [("gen-0", 30)]


@pytest.mark.timeout(120)
def test_generate_returns_a_request_aborted_while_it_runs(engine):
    """A request of generate() aborted meanwhile (from on_tokens, as for a client that went
    away) comes back with finish_reason "abort"; generate() does not wait for it forever."""
    aborted = []

    def on_tokens(request_id, text, finish_reason):
        if finish_reason is None and not aborted:
            aborted.append(engine.abort_request(request_id))

    engine.on_tokens = on_tokens
    try:
        outs = engine.generate(["a", "b"], SamplingParams(max_tokens=8, temperature=0,
                                                          ignore_eos=True, stream=True),
                               use_tqdm=False, order="input")
    finally:
        engine.on_tokens = None
    assert len(aborted) == 1
    reasons = {o.request_id: o.outputs[0].finish_reason for o in outs}
    assert reasons[aborted[0].request_id] == "abort"
    assert sorted(reasons.values()) == ["abort", "length"]
    assert not engine.has_unfinished_requests()


def test_a_request_that_finishes_inside_generate_comes_from_the_next_step(engine):
    """A request of add_request that finishes while generate() steps the engine is not lost:
    it stays unfinished to the caller until the next step() returns it."""
    engine.add_request("mine", "x", SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    outs = engine.generate("a", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                           use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [10]
    assert engine.has_unfinished_requests() and engine.num_unfinished_requests() == 1
    done = engine.step()
    assert [(o.request_id, o.finished, len(o.outputs[0].token_ids)) for o in done] == \
        [("mine", True, 2)]
    assert not engine.has_unfinished_requests()


def test_generate_never_takes_the_id_of_a_request_waiting_to_be_returned(tiny_llama):
    """A request of add_request named like generate()'s own ids ("gen-1") that finished inside
    one generate() call waits for the next step(); a second generate() must not name one of
    its requests "gen-1" and return that waiting output as its own."""
    engine = LLMEngine(EngineConfig(model=str(tiny_llama.dir), max_num_seqs=4,
                                    max_model_len=64))   # fresh: its ids start at gen-0
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    engine.add_request("gen-1", "x", sp)
    engine.generate("a", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                    use_tqdm=False)
    outs = engine.generate(["b"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                           use_tqdm=False)
    assert [(o.prompt, len(o.outputs[0].token_ids)) for o in outs] == [("b", 5)]
    assert [(o.request_id, o.prompt, len(o.outputs[0].token_ids)) for o in engine.step()] == \
        [("gen-1", "x", 2)]
    assert not engine.has_unfinished_requests()


def test_outputs_waiting_to_be_returned_survive_a_step_that_raises(engine, monkeypatch):
    """A step that raises (a failed forward) hands back nothing: the outputs that finished
    inside a generate() call are still returned by the next step that works."""
    engine.add_request("mine", "x", SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    engine.generate("a", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                    use_tqdm=False)
    engine.add_request("next", "y", SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))

    def broken():
        raise RuntimeError("forward failed")
    with monkeypatch.context() as m:
        m.setattr(engine, "_step", broken)
        with pytest.raises(RuntimeError, match="forward failed"):
            engine.step()
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: len(o.outputs[0].token_ids) for o in engine.step()})
    assert done == {"mine": 2, "next": 3}
