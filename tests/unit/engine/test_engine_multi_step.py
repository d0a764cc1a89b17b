"""Multi-step decode rounds (``num_scheduler_steps``): several greedy decode steps run back to
back on the device, each step's argmax feeding the next; the host reads the tokens once per
round. A round must give exactly the tokens, texts and finish reasons of single steps."""
from __future__ import annotations

import pytest
import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from tests.unit.engine.conftest import peft_greedy

NAMES = ["qv_r8", "all_r4_rslora", "mlp_r16", "pattern"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


def _engine(base, steps, **kw):
    cfg = {"max_loras": 4, "max_lora_rank": 16, "max_num_seqs": 8, "max_model_len": 96,
           "device": "cpu", "dtype": "float32", "num_scheduler_steps": steps, **kw}
    eng = LLMEngine(EngineConfig(model=str(base.dir), **cfg))
    for i, name in enumerate(NAMES):  # loaded now, not in the background: a fixed order
        eng.add_lora(LoRARequest(name, i + 1, str(base.adapters[name])))
    return eng


def _requests(base, n=14, **params):
    """Prompts of unequal lengths (half sharing a head), adapters mixed with base rows,
    answers of 1..33 tokens: rows finish at every point of a round."""
    loras = [LoRARequest(name, i + 1, str(base.adapters[name])) for i, name in enumerate(NAMES)]
    head = [11 + (5 * j) % 90 for j in range(21)]
    prompts = [([] if i % 2 else head) + [3 + (7 * i + j) % 200 for j in range(2 + 3 * (i % 5))]
               for i in range(n)]
    sp = [SamplingParams(**{"max_tokens": 1 + (i * 7) % 33, "temperature": 0.0,
                            "ignore_eos": True, **params}) for i in range(n)]
    return prompts, sp, [loras[i % 4] if i % 3 else None for i in range(n)]


def _generate(eng, prompts, sp, loras):
    outs = eng.generate(prompts, sp, loras, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
            for o in outs], outs


@pytest.mark.parametrize("device", DEVICES)
def test_rounds_give_the_tokens_of_single_steps_and_pefts(tiny_llama, device):
    """8-step rounds (CUDA: graph replays with the inputs advanced on the device) against one
    step at a time and PEFT: adapters mixed with base rows, a pool small enough to preempt."""
    reqs = _requests(tiny_llama)
    kw = {"device": device, "block_size": 8, "num_kv_blocks": 24}
    one = _engine(tiny_llama, 1, **kw)
    want, _ = _generate(one, *reqs)
    eng = _engine(tiny_llama, 8, **kw)
    got, outs = _generate(eng, *reqs)
    assert got == want
    steps = eng.cache_stats()["steps"]["decode"]
    assert steps["rounds"] > 0 and one.cache_stats()["steps"]["decode"]["rounds"] == 0
    assert steps["steps"] > steps["rounds"]             # rounds of several steps ran
    kv = eng.cache_stats()["kv"]
    assert kv["blocks_free"] == kv["blocks_total"]      # the rounds' extra blocks came back
    peft = tiny_llama.peft()
    for out, (tokens, _, _) in zip(outs, got):
        name = out.lora_request.lora_name if out.lora_request else None
        assert tokens == peft_greedy(peft, out.prompt_token_ids, len(tokens), name)[0]


def test_stop_tokens_stop_strings_and_max_model_len_inside_a_round(tiny_llama):
    """A row that stops in the middle of a round (a stop token, a stop string, the end of
    max_model_len) ends exactly where it ends one step at a time, with the same text."""
    prompts, sp, loras = _requests(tiny_llama, n=6)
    free = _engine(tiny_llama, 1).generate(prompts, sp, loras, use_tqdm=False)
    params = []
    for i, o in enumerate(free):
        ids, text = o.outputs[0].token_ids, o.outputs[0].text
        if i % 3 == 0 and len(ids) > 3:      # stop at a token first generated mid-answer
            params.append(SamplingParams(max_tokens=40, temperature=0.0,
                                         stop_token_ids=[ids[len(ids) // 2]]))
        elif i % 3 == 1 and len(text) > 4:    # a stop string
            params.append(SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                                         stop=text[len(text) // 2:len(text) // 2 + 2]))
        else:                                 # runs into max_model_len (96)
            params.append(SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    want, _ = _generate(_engine(tiny_llama, 1), prompts, params, loras)
    eng = _engine(tiny_llama, 8)
    got, outs = _generate(eng, prompts, params, loras)
    assert got == want
    assert {r for _, _, r in got} == {"stop", "length"}
    assert any(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) == 96 for o in outs)
    assert eng.cache_stats()["steps"]["decode"]["rounds"] > 0


def test_rows_that_need_the_host_decode_a_step_at_a_time(tiny_llama):
    """Sampled, penalized or logprobs rows keep single steps (while any runs, no round) and
    get the tokens they get with num_scheduler_steps=1; greedy rows alone run rounds."""
    prompts, sp, loras = _requests(tiny_llama, n=8)
    for extra in ({"temperature": 0.8, "seed": 7}, {"repetition_penalty": 1.3},
                  {"logprobs": 2}):
        mixed = [SamplingParams(**{"max_tokens": p.max_tokens, "temperature": 0.0,
                                   "ignore_eos": True, **(extra if i == 0 else {})})
                 for i, p in enumerate(sp)]
        want, _ = _generate(_engine(tiny_llama, 1), prompts, mixed, loras)
        eng = _engine(tiny_llama, 8)
        got, _ = _generate(eng, prompts, mixed, loras)
        assert got == want, extra
    only = [SamplingParams(max_tokens=30, temperature=0.9, seed=i) for i in range(4)]
    eng = _engine(tiny_llama, 8)
    eng.generate(prompts[:4], only, use_tqdm=False)
    assert eng.cache_stats()["steps"]["decode"]["rounds"] == 0


def test_streaming_in_rounds_joins_to_the_final_text(tiny_llama):
    """Streamed pieces come a round at a time and still join to the finished text."""
    eng = _engine(tiny_llama, 8)
    pieces: dict[str, list] = {}
    eng.on_tokens = lambda rid, text, reason: pieces.setdefault(rid, []).append((text, reason))
    sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stream=True)
    out = eng.generate([[5, 6, 7, 8]], sp, use_tqdm=False)[0]
    got = pieces[out.request_id]
    assert "".join(t for t, _ in got) == out.outputs[0].text
    assert got[-1][1] == "length" and all(r is None for _, r in got[:-1])
    assert 2 <= len(got) <= 30 // 8 + 3       # a piece per round, not per token


def test_rounds_in_a_pool_that_preempts_keep_the_tokens(tiny_llama):
    """Blocks of one token and a pool of one max_model_len sequence: rounds take their
    blocks only when every row's fit (else a single step), rows are preempted and
    recomputed, and the tokens do not change."""
    prompts, sp, loras = _requests(tiny_llama, n=8)
    kw = {"block_size": 1, "num_kv_blocks": 97}    # one sequence of max_model_len, no more
    want, _ = _generate(_engine(tiny_llama, 1, **kw), prompts, sp, loras)
    eng = _engine(tiny_llama, 8, **kw)
    got, _ = _generate(eng, prompts, sp, loras)
    assert got == want
    assert eng.cache_stats()["kv"]["preemptions"] > 0    # the pool was that tight


def test_num_scheduler_steps_is_checked():
    with pytest.raises(ValueError, match="num_scheduler_steps"):
        EngineConfig(model="m", num_scheduler_steps=0)


@pytest.mark.parametrize("device", DEVICES)
def test_unseeded_sampled_rows_are_drawn_on_the_device_in_rounds(tiny_llama, device):
    """Rows sampled without a seed of their own run in rounds, drawn on the device: with
    top-k 1 or a tiny top-p they give the greedy tokens, the engine's seed makes a round's
    draws reproducible, and temperature 1 draws differ from greedy ones."""
    prompts, sp, loras = _requests(tiny_llama, n=8)
    greedy, _ = _generate(_engine(tiny_llama, 1, device=device), prompts, sp, loras)
    narrow = [SamplingParams(max_tokens=p.max_tokens, temperature=0.7, ignore_eos=True,
                             **({"top_k": 1} if i % 2 else {"top_p": 1e-6}))
              for i, p in enumerate(sp)]
    eng = _engine(tiny_llama, 8, device=device)
    got, _ = _generate(eng, prompts, narrow, loras)
    assert [t for t, _, _ in got] == [t for t, _, _ in greedy]
    assert eng.cache_stats()["steps"]["decode"]["rounds"] > 0
    free = [SamplingParams(max_tokens=32, temperature=1.0, ignore_eos=True) for _ in sp]
    runs = []
    for _ in range(2):
        eng = _engine(tiny_llama, 8, device=device, seed=3)
        runs.append(_generate(eng, prompts, free, loras)[0])
        assert eng.cache_stats()["steps"]["decode"]["rounds"] > 0
    assert runs[0] == runs[1]
    want, _ = _generate(_engine(tiny_llama, 1, device=device), prompts,
                        [SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)] * 8,
                        loras)
    assert [t for t, _, _ in runs[0]] != [t for t, _, _ in want]


@pytest.mark.parametrize("steps", [1, 8])
def test_a_request_aborted_by_a_callback_inside_a_round_gets_nothing_more(tiny_llama, steps):
    """An on_tokens callback aborts B when A finishes (inside a round with 8 steps): B's
    output is the abort's, with no later tokens, outputs or callbacks."""
    eng = _engine(tiny_llama, steps)
    calls, outs = [], []

    def on_tokens(rid, text, reason):
        calls.append((rid, reason))
        if rid == "A" and reason is not None:
            outs.append(eng.abort_request("B"))

    eng.on_tokens = on_tokens
    eng.add_request("B", [5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0,
                                                    ignore_eos=True, stream=True))
    for i in range(6):
        eng.add_request(f"x{i}", [10 + i, 11], SamplingParams(max_tokens=20, temperature=0.0,
                                                              ignore_eos=True))
    eng.add_request("A", [8, 9], SamplingParams(max_tokens=2, temperature=0.0,
                                                 ignore_eos=True, stream=True))
    b = eng._seqs["B"]
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.request_id == "B"]
    assert [(o.request_id, o.outputs[0].finish_reason) for o in outs] == [("B", "abort")]
    assert len(b.output_token_ids) == len(outs[0].outputs[0].token_ids) < 6
    assert b.finish_reason == "abort"
    assert calls[calls.index(("A", "length")) + 1:] == [("B", "abort")]


def test_decode_rows_count_the_tokens_kept(tiny_llama):
    """cache_stats' decode rows count the tokens rounds keep, not the steps rows compute
    after their end: every output token is a prefill's first token or a counted row."""
    prompts, sp, loras = _requests(tiny_llama)
    eng = _engine(tiny_llama, 8)
    got, _ = _generate(eng, prompts, sp, loras)
    steps = eng.cache_stats()["steps"]
    assert steps["decode"]["rounds"] > 0 and eng.cache_stats()["kv"]["preemptions"] == 0
    assert sum(len(t) for t, _, _ in got) == \
        len(prompts) + steps["prefill"]["rows"] + steps["decode"]["rows"]


def test_graph_rounds_advance_the_static_inputs(tiny_llama, monkeypatch):
    """DecodeGraphs.run_steps on the CPU: a stand-in graph whose replay reruns the captured
    step on the static buffers (as a CUDA graph does) must give single steps' tokens, so the
    round's updates of the static token, position and KV-slot inputs are right."""
    from lorry.engine import graphs as G

    class Replay:
        def __init__(self, fn):
            self.replay = fn

    class CpuGraphs(G.DecodeGraphs):
        def _capture(self, size, lora_key):
            logits = self._forward(size, lora_key).clone()
            self.captures += 1
            return Replay(lambda: logits.copy_(self._forward(size, lora_key))), logits

    init = G.GraphInputs.__init__
    monkeypatch.setattr(G.GraphInputs, "__init__",
                        lambda self, rows, blocks, bs, pin=True: init(self, rows, blocks, bs,
                                                                      pin=False))
    reqs = _requests(tiny_llama)
    want, _ = _generate(_engine(tiny_llama, 1, block_size=8), *reqs)
    eng = _engine(tiny_llama, 8, block_size=8)
    c = eng.config
    eng.runner.graphs = CpuGraphs(eng.model, eng.runner.ops, c.max_loras, c.max_num_seqs,
                                  eng.max_model_len, eng.device, c.block_size)
    eng.runner.graphs.slot_rows = eng.loras.gpu.rows   # as engine.setup wires it
    got, _ = _generate(eng, *reqs)
    assert got == want
    assert eng.cache_stats()["steps"]["decode"]["rounds"] > 0 and eng.runner.graphs.captures
    # capture_graphs: every bucket now (with and without the resident adapters' layers), so
    # the next generate captures none, and its tokens are the same
    graphs = eng.runner.graphs
    done = graphs.captures
    n = eng.capture_graphs()
    assert n == 2 * len(graphs.sizes) - done and graphs.captures == 2 * len(graphs.sizes)
    assert eng.capture_graphs() == 0
    again, _ = _generate(eng, *reqs)
    assert again == want and graphs.captures == 2 * len(graphs.sizes)
