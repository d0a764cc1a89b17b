"""The committed demo adapters change the base model's answers in the way their names promise."""
from __future__ import annotations

import json

import pytest
import torch
from demo_checks import ADAPTERS_DIR, CHECKS, demo_lora, score
from demo_data import held_out_prompts

MAJORITY = 0.7
pytestmark = pytest.mark.slow  # one real 135M engine batch (~100 s on the shared 2-core CPU)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_adapter_shows_its_behaviour_where_the_base_does_not(held_out_answers, name):
    check = CHECKS[name]
    own, base = score(held_out_answers[name], check), score(held_out_answers[None], check)
    detail = json.dumps({"adapter": held_out_answers[name], "base": held_out_answers[None]},
                        indent=1)
    assert own >= MAJORITY, f"{name}: only {own:.0%} of held-out answers pass\n{detail}"
    assert base <= 1 - MAJORITY, f"{name}: the base already passes {base:.0%}\n{detail}"


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_adapters_do_not_leak_into_each_other(held_out_answers, name):
    # the rows of one mixed batch must each get their own adapter, not a neighbour's
    for other in sorted(CHECKS):
        if other != name:
            passed = score(held_out_answers[other], CHECKS[name])
            assert passed <= 1 - MAJORITY, (f"{other}'s answers pass {name}'s check "
                                            f"({passed:.0%}): {held_out_answers[other]}")


def test_committed_adapters_have_mixed_ranks_and_model_cards():
    configs = {n: json.loads((ADAPTERS_DIR / n / "adapter_config.json").read_text())
               for n in CHECKS}
    assert len({c["r"] for c in configs.values()}) == len(configs), configs
    assert len({tuple(sorted(c["target_modules"])) for c in configs.values()}) == len(configs)
    for n in CHECKS:
        card = (ADAPTERS_DIR / n / "README.md").read_text()
        assert "SmolLM2-135M-Instruct" in card and "held-out" in card, n


def test_engine_matches_peft_on_a_demo_adapter(demo_engine):
    # cross-check the engine against PEFT on a real trained adapter (greedy, 16 tokens)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorry.engine import SamplingParams

    model_dir = demo_engine.info()["model_dir"]
    messages = [{"role": "user", "content": held_out_prompts()[1]}]
    lora = demo_lora("json")
    ours = demo_engine.generate([messages], SamplingParams(max_tokens=16, temperature=0.0),
                                lora_request=lora, use_tqdm=False)[0].outputs[0].token_ids
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(ADAPTERS_DIR / "json")).eval()
    with torch.no_grad():
        out = peft.generate(ids, max_new_tokens=16, do_sample=False)
    assert list(ours) == out[0, ids.shape[1]:].tolist()[:len(ours)]
