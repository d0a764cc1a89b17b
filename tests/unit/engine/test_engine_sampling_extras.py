"""Penalties, logprobs and streamed text: Hugging Face + PEFT parity and hand-computed logits."""
from __future__ import annotations

import copy

import pytest
import torch

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.engine.outputs import RequestMetrics
from lorry.engine.sampler import (
    NOT_FINITE,
    RoundSampler,
    apply_penalties,
    sample,
    token_logprobs,
)
from lorry.engine.sequence import Sequence

PROMPTS = ["Hello there hello there", "abcabcabc", "The quick brown fox"]


def _engine(base, **kw):
    """fp32 on the CPU unless a test names a device: the parity tests compare against HF fp32
    on the CPU (``device="auto"`` would pick CUDA and bf16 on a GPU machine)."""
    kw = {"device": "cpu", "dtype": "float32", **kw}
    return LLMEngine(EngineConfig(model=str(base.dir), max_loras=2, max_lora_rank=16,
                                  max_num_seqs=8, max_model_len=128, **kw))


def _hf_generate(model, prompt_ids, max_new, **kw):
    """HF generate (greedy): new tokens, raw logits and processed scores per step."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False,
                         output_scores=True, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=2, **kw)
    return (out.sequences[0, len(prompt_ids):].tolist(), torch.cat(out.logits),
            torch.cat(out.scores))


def _peft_single(base, name):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base.hf), str(base.adapters[name])).eval()


def test_repetition_penalty_matches_hf_generate_with_peft(tiny_llama):
    """Greedy tokens with repetition_penalty equal transformers' generate(repetition_penalty)
    on the PEFT model, in one mixed batch of penalized and plain rows and adapters."""
    eng = _engine(tiny_llama)
    lora = LoRARequest("qv_r8", 1, str(tiny_llama.adapters["qv_r8"]))
    params = [SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.8),
              SamplingParams(max_tokens=12, temperature=0.0),
              SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=0.7)]
    loras = [lora, lora, None]
    outs = eng.generate(PROMPTS, params, loras, use_tqdm=False)
    peft = _peft_single(tiny_llama, "qv_r8")
    with torch.no_grad():
        for out, sp, lr in zip(outs, params, loras):
            model = peft if lr is not None else tiny_llama.hf
            hf_tokens, _, _ = _hf_generate(model, out.prompt_token_ids, 12,
                                           repetition_penalty=sp.repetition_penalty)
            assert out.outputs[0].token_ids == hf_tokens
        # the penalty matters: without it the first row's greedy answer differs
        plain, _, _ = _hf_generate(peft, outs[0].prompt_token_ids, 12)
    assert plain != outs[0].outputs[0].token_ids


def test_logprobs_equal_log_softmax_of_hf_logits(tiny_llama):
    """logprobs are the raw model distribution's: log_softmax of HF's logits for the chosen
    tokens within 1e-4 (also under a repetition penalty, which changes only the choice), and
    top_logprobs come sorted, of the requested size."""
    eng = _engine(tiny_llama)
    lora = LoRARequest("all_r4_rslora", 1, str(tiny_llama.adapters["all_r4_rslora"]))
    params = [SamplingParams(max_tokens=8, temperature=0.0, logprobs=5, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True,
                             repetition_penalty=1.5),
              SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)]
    outs = eng.generate(PROMPTS, params, [lora, None, lora], use_tqdm=False)
    peft = _peft_single(tiny_llama, "all_r4_rslora")
    for out, sp, model in zip(outs[:2], params, [peft, tiny_llama.hf]):
        comp = out.outputs[0]
        with torch.no_grad():
            hf_tokens, hf_logits, hf_scores = _hf_generate(
                model, out.prompt_token_ids, 8, repetition_penalty=sp.repetition_penalty,
                eos_token_id=None)
        assert comp.token_ids == hf_tokens
        want = torch.log_softmax(hf_logits.float(), -1)                       # [8, V]
        assert len(comp.logprobs) == len(comp.token_ids) == 8
        for step, (entry, tok) in enumerate(zip(comp.logprobs, comp.token_ids)):
            assert next(iter(entry)) == tok  # the chosen token comes first
            assert entry[tok].logprob == pytest.approx(want[step, tok].item(), abs=1e-4)
            assert entry[tok].rank == int((want[step] > want[step, tok]).sum()) + 1
            assert entry[tok].decoded_token == eng.tokenizer.token_text(tok)
            top = sorted((lp for lp in entry.values() if lp.rank <= sp.logprobs),
                         key=lambda lp: lp.rank)
            assert [lp.rank for lp in top] == list(range(1, sp.logprobs + 1))
            values = [lp.logprob for lp in top]
            assert values == sorted(values, reverse=True)
            torch.testing.assert_close(torch.tensor(values), want[step].topk(sp.logprobs).values,
                                       atol=1e-4, rtol=0)
        if sp.repetition_penalty != 1.0:  # HF's scores are the penalized ones that chose
            assert (hf_scores.argmax(-1) == torch.tensor(hf_tokens)).all()
        assert comp.cumulative_logprob == pytest.approx(
            sum(want[i, t].item() for i, t in enumerate(comp.token_ids)), abs=1e-3)
    assert outs[2].outputs[0].logprobs is None


def _seq(prompt, output, **params):
    s = Sequence("r", None, list(prompt), SamplingParams(**params), None, RequestMetrics(0.0))
    s.output_token_ids = list(output)
    return s


def test_presence_and_frequency_penalties_by_hand():
    """OpenAI's rule: logit -= frequency * count + presence * (count > 0), over the output
    only; Hugging Face's repetition rule over prompt + output; unpenalized rows untouched."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0],
                           [2.0, -1.0, 0.5, 3.0, -2.0],
                           [2.0, -1.0, 0.5, 3.0, -2.0]])
    seqs = [_seq([4], [3, 3, 1], presence_penalty=0.5, frequency_penalty=0.25),
            _seq([0, 4], [1], repetition_penalty=2.0),
            _seq([0], [3, 3])]
    out = apply_penalties(logits, seqs)
    want = torch.tensor([[2.0, -1.0 - 0.25 - 0.5, 0.5, 3.0 - 0.5 - 0.5, -2.0],
                         [1.0, -2.0, 0.5, 3.0, -4.0],
                         [2.0, -1.0, 0.5, 3.0, -2.0]])
    torch.testing.assert_close(out, want)
    assert logits[0, 3] == 3.0  # the step's logits are not changed in place
    # greedy picks from the penalized logits: a frequency penalty moves the choice off token 3
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, [_seq([0], [3, 3], temperature=0.0, frequency_penalty=2.0)] * 3,
                  gen)[0] == 0
    assert sample(logits, [_seq([0], [3, 3], temperature=0.0)] * 3, gen)[0] == 3
    # a negative presence penalty favours tokens already generated
    assert sample(logits, [_seq([0], [4], temperature=0.0, presence_penalty=-2.0)] * 3,
                  gen)[0] == 3
    lp = token_logprobs(logits, [_seq([0], [], logprobs=2), _seq([0], [])], [3, 0])
    assert list(lp) == [0]
    assert list(lp[0]) == [3, 0]  # chosen (also the most likely) first, then the next one
    assert lp[0][3].logprob == pytest.approx(torch.log_softmax(logits[0], -1)[3].item())


def test_rows_whose_logits_are_not_finite_are_marked_never_sampled():
    """A row with NaN, +inf or only -inf logits (an adapter overflowing the serving dtype) is
    NOT_FINITE, greedy or sampled, in a step and in a device round (whose next inputs stay
    valid ids); the other rows are what they are without it. -inf entries are fine."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=gen)
    logits[0, 2] = float("-inf")
    bad = logits.clone()
    bad[1, 3], bad[2, 5], bad[3] = float("nan"), float("inf"), float("-inf")
    seqs = [_seq([1], [], temperature=0.0), _seq([1], [], temperature=1.0),
            _seq([1], [], temperature=0.7, top_k=3), _seq([1], [], temperature=0.0)]
    want = sample(logits, seqs, torch.Generator().manual_seed(1))
    got = sample(bad, seqs, torch.Generator().manual_seed(1))
    assert got[0] == want[0] and got[1:] == [NOT_FINITE] * 3
    pick = RoundSampler(seqs, torch.Generator().manual_seed(2), "cpu")
    out = torch.empty(2, 4, dtype=torch.long)
    pick(logits, out[0])
    pick(bad, out[1])
    assert 0 <= int(out.min()) and int(out.max()) < 10   # the next step's inputs
    marked = pick.marked(out).tolist()
    assert marked[0] == out[0].tolist()
    assert marked[1] == [int(out[1, 0])] + [NOT_FINITE] * 3


@pytest.mark.parametrize("kw, match", [
    ({"n": 2}, "only n=1"), ({"logprobs": 21}, r"\[0, 20\]"),
    ({"presence_penalty": 2.5}, r"\[-2, 2\]"), ({"repetition_penalty": 0.0}, r"\(0, 10\]"),
    ({"frequency_penalty": float("nan")}, r"\[-2, 2\]"),
    # what torch's generator cannot take, and types a worker's JSON may hold: ValueErrors
    # naming the field (the worker refuses a job's sampling on ValueError only)
    ({"seed": 2**64}, r"seed=.*\[-2\*\*63, 2\*\*64\)"), ({"seed": -2**63 - 1}, "seed="),
    ({"stop": 5}, "stop=5"), ({"stop_token_ids": 3}, "stop_token_ids=3"),
    ({"stop": 0}, "stop=0"), ({"stop_token_ids": False}, "stop_token_ids=False"),
    ({"stop": b"end"}, "stop=b'end'")])
def test_out_of_range_sampling_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)
    with pytest.raises(ValueError, match=match):
        SamplingParams.from_dict(kw)


def test_stop_and_stop_token_ids_take_any_sequence():
    """As vLLM: a tuple, set or range of token ids, a tuple of strings."""
    sp = SamplingParams(stop=("a", "b"), stop_token_ids=range(3, 6))
    assert sp.stop_list == ["a", "b"] and sp.stop_token_ids == [3, 4, 5]
    assert SamplingParams(stop_token_ids={7}).stop_token_ids == [7]


def test_streamed_text_concatenates_to_the_final_text(tiny_llama):
    """on_tokens gets each step's new text of stream=True requests; the pieces join to the
    finished text, also when a stop string cuts it; other requests are never streamed."""
    eng = _engine(tiny_llama)
    pieces: dict[str, list] = {}
    eng.on_tokens = lambda rid, text, reason: pieces.setdefault(rid, []).append((text, reason))
    base = eng.generate(PROMPTS[0], SamplingParams(max_tokens=16, temperature=0.0,
                                                   ignore_eos=True), use_tqdm=False)[0]
    full = base.outputs[0].text
    stop = full[5:7]
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stream=True),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, stream=True,
                             stop=stop),
              SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)]
    outs = eng.generate([PROMPTS[0]] * 3, params, use_tqdm=False)
    assert len(pieces) == 2
    for out in outs[:2]:
        got = pieces[out.request_id]
        assert "".join(t for t, _ in got) == out.outputs[0].text
        assert [r for _, r in got][-1] == out.outputs[0].finish_reason
        assert all(r is None for _, r in got[:-1])
    assert outs[0].outputs[0].text == full and len(pieces[outs[0].request_id]) > 2
    assert outs[1].outputs[0].text == full[:full.index(stop)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_penalties_and_logprobs_under_cuda_graphs_equal_cpu(tiny_llama):
    """Penalties and logprobs work on the logits a graph replay returns: the CUDA-graph decode
    (fp32) gives the CPU path's tokens and logprobs."""
    def run(device):
        eng = _engine(tiny_llama, device=device, dtype="float32")
        lora = LoRARequest("pattern", 1, str(tiny_llama.adapters["pattern"]))
        params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=3,
                                 repetition_penalty=1.4, presence_penalty=0.3,
                                 frequency_penalty=0.6),
                  SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)]
        outs = eng.generate(PROMPTS[:2], params, [lora, None], use_tqdm=False)
        return eng, [o.outputs[0] for o in outs]

    eng, gpu = run("cuda")
    assert eng.runner.graphs is not None and eng.runner.graphs.captures >= 1
    _, cpu = run("cpu")
    assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]
    for g, c in zip(gpu[0].logprobs, cpu[0].logprobs):
        assert list(g) == list(c)
        for tid in g:
            assert g[tid].logprob == pytest.approx(c[tid].logprob, abs=1e-3)
