"""Adapter configs resolved as PEFT resolves them: rank/alpha patterns with regex alternation
and overlapping keys (first match in the saved order), the default lora_alpha; adapters whose
weights fit only a changed base (PiSSA, OLoRA, CorDA, LoftQ saved unconverted) or that act
only after invocation tokens (aLoRA) are refused, not served as plain LoRA."""
from __future__ import annotations

import json

import pytest
from peft.utils.other import get_pattern_key

from lorry.engine import EngineConfig, LLMEngine, LoRARequest, SamplingParams
from lorry.engine.errors import UnsupportedAdapterError
from lorry.engine.lora.spec import _pattern_value, parse_adapter, read_base_config
from lorry.testing import make_peft_adapter
from tests.unit.engine.conftest import peft_greedy

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# alternation, an overlapping specific key before a general one, and a key that only a
# prefix-free regex reaches
RANKS = {"gate_proj|up_proj": 4, "layers.1.self_attn.q_proj": 2, "q_proj": 6, "k_pro.": 3}
ALPHAS = {"down_proj|o_proj": 32, "layers.0.mlp.up_proj": 4, "up_proj": 24}


@pytest.mark.parametrize("name", [
    "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj",
    "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"])
def test_pattern_lookup_picks_the_key_peft_picks(name):
    for pattern in (RANKS, ALPHAS):
        key = get_pattern_key(pattern.keys(), name)
        assert _pattern_value(pattern, name, "default") == pattern.get(key, "default")


def test_patterned_adapter_equals_peft(tiny_llama, tmp_path):
    path = make_peft_adapter(tiny_llama.dir, tmp_path / "patterns", r=8, lora_alpha=16,
                             target_modules=ALL, rank_pattern=RANKS, alpha_pattern=ALPHAS,
                             base_model=tiny_llama.hf, seed=7)
    spec = parse_adapter(path, read_base_config(tiny_llama.dir))
    ranks = {(layer, module): r for (layer, module), (_, _, r, _, _) in spec.modules.items()}
    assert ranks[(0, "gate_proj")] == ranks[(1, "up_proj")] == 4
    assert ranks[(1, "q_proj")] == 2 and ranks[(0, "q_proj")] == 6 and ranks[(0, "k_proj")] == 3
    import copy

    from peft import PeftModel

    peft = PeftModel.from_pretrained(copy.deepcopy(tiny_llama.hf), str(path)).eval()
    engine = LLMEngine(EngineConfig(model=str(tiny_llama.dir), device="cpu", max_loras=1,
                                    max_lora_rank=8, max_num_seqs=2, max_model_len=64))
    prompt = [5, 9, 14, 3, 22, 7]
    want, _ = peft_greedy(peft, prompt, 8, "default")
    [out] = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0,
                                                     ignore_eos=True),
                            lora_request=[LoRARequest("patterns", 1, str(path))], use_tqdm=False)
    assert out.outputs[0].token_ids == want


def _rewrite(path, **changes):
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    cfg_file.write_text(json.dumps(cfg))


def test_missing_lora_alpha_is_peft_default(tiny_llama, tmp_path):
    path = make_peft_adapter(tiny_llama.dir, tmp_path / "noalpha", r=4, lora_alpha=8,
                             base_model=tiny_llama.hf)
    _rewrite(path, lora_alpha=None)
    spec = parse_adapter(path, read_base_config(tiny_llama.dir))
    assert spec.lora_alpha == 8
    assert {s for (_, _, _, s, _) in spec.modules.values()} == {8 / 4}


@pytest.mark.parametrize("changes, says", [
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4'"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"init_lora_weights": "corda"}, "init_lora_weights='corda'"),
    ({"init_lora_weights": "loftq"}, "init_lora_weights='loftq'"),
    ({"alora_invocation_tokens": [3, 4]}, "alora_invocation_tokens"),
])
def test_adapters_for_a_changed_base_or_invocation_are_refused(tiny_llama, tmp_path, changes,
                                                                 says):
    path = make_peft_adapter(tiny_llama.dir, tmp_path / "odd", base_model=tiny_llama.hf)
    _rewrite(path, **changes)
    with pytest.raises(UnsupportedAdapterError, match=says):
        parse_adapter(path, read_base_config(tiny_llama.dir))


@pytest.mark.parametrize("init", [True, "gaussian", "eva", "orthogonal"])
def test_inits_that_leave_the_base_alone_are_served(tiny_llama, tmp_path, init):
    path = make_peft_adapter(tiny_llama.dir, tmp_path / "fine", base_model=tiny_llama.hf)
    _rewrite(path, init_lora_weights=init)
    assert parse_adapter(path, read_base_config(tiny_llama.dir)).modules
