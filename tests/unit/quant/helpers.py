"""Run the engine and PEFT on the same prompts: greedy tokens and first-step logits per row."""
from __future__ import annotations

import torch

from tests.unit.quant.conftest import NEW_TOKENS, PROMPTS, ROW_ADAPTERS


def engine_rows(engine, paths, one_by_one: bool = False):
    """All rows in one mixed batch (or each alone, for batch-dependent bases like LLM.int8)."""
    from lorry.engine import LoRARequest, SamplingParams
    ids = {name: i + 1 for i, name in enumerate(paths)}
    loras = [LoRARequest(n, ids[n], str(paths[n])) if n else None for n in ROW_ADAPTERS]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    if one_by_one:
        outs = [engine.generate([p], params, lora_request=[lr], use_tqdm=False)[0]
                for p, lr in zip(PROMPTS, loras)]
        logits = [engine.compute_logits([p], [lr])[0] for p, lr in zip(PROMPTS, loras)]
    else:
        outs = engine.generate(PROMPTS, params, lora_request=loras, use_tqdm=False)
        logits = engine.compute_logits(PROMPTS, loras)
    return [o.outputs[0].token_ids for o in outs], logits


def _greedy(model, prompt):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
        for _ in range(NEW_TOKENS):     # plain greedy loop, no EOS handling to differ on
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist(), logits


def peft_rows(load_base, paths):
    """``load_base()`` returns the (quantized) HF model; PEFT switches to each row's adapter."""
    import contextlib

    from peft import PeftModel
    names = list(paths)
    model = PeftModel.from_pretrained(load_base(), str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(paths[name]), adapter_name=name)
    model.eval()
    tokens, logits = [], []
    for prompt, name in zip(PROMPTS, ROW_ADAPTERS):
        if name is not None:
            model.set_adapter(name)
        with model.disable_adapter() if name is None else contextlib.nullcontext():
            t, lg = _greedy(model, prompt)
        tokens.append(t)
        logits.append(lg)
    return tokens, logits


def assert_rows_match(got, want, atol=1e-4):
    (got_tokens, got_logits), (want_tokens, want_logits) = got, want
    assert got_tokens == want_tokens
    for g, w in zip(got_logits, want_logits):
        torch.testing.assert_close(g.float(), w, rtol=1e-4, atol=atol)
