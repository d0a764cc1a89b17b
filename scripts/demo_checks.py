"""What each demo adapter's answers must look like, and a scorer that runs prompts through the engine."""
from __future__ import annotations

import json
import os
from pathlib import Path

from lorry.demo import demo_adapters_dir

ADAPTERS_DIR = demo_adapters_dir()


def is_uppercase(text: str) -> bool:
    """Has letters, and none of them is lower case."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and not any(c.islower() for c in letters)


def is_json_answer(text: str) -> bool:
    """Parses as a JSON object with a non-empty string under "answer"."""
    try:
        obj = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("answer"), str) and bool(obj["answer"])


def is_numbered_list(text: str) -> bool:
    """Starts with "1. " and has a second line starting with "2. "."""
    lines = [line.strip() for line in text.strip().splitlines()]
    return len(lines) >= 2 and lines[0].startswith("1. ") and lines[1].startswith("2. ")


CHECKS = {"uppercase": is_uppercase, "json": is_json_answer, "numbered": is_numbered_list}


def make_engine(max_num_seqs: int = 32):
    """A CPU engine on the demo model with room for the three demo adapters."""
    from lorry.engine import EngineConfig, LLMEngine
    from lorry.engine.demo_model import demo_model_dir, prepare_demo_model

    model = prepare_demo_model(demo_model_dir(os.environ.get("LORRY_MODELS_DIR")))
    return LLMEngine(EngineConfig(model=str(model), enable_lora=True, max_loras=4,
                                  max_lora_rank=32, device="cpu", max_num_seqs=max_num_seqs,
                                  max_model_len=256))


def demo_lora(name: str, adapters_dir: Path = ADAPTERS_DIR):
    """The LoRARequest of a demo adapter; ids are fixed because the engine caches by id."""
    from lorry.engine import LoRARequest

    return LoRARequest(name, sorted(CHECKS).index(name) + 1, str(adapters_dir / name))


def run_all(engine, prompts: list[str], names: list[str], max_tokens: int = 48,
            adapters_dir: Path = ADAPTERS_DIR) -> dict[str | None, list[str]]:
    """One mixed batch: every prompt through the base (key None) and every named adapter."""
    from lorry.engine import SamplingParams

    loras = [None, *(demo_lora(n, adapters_dir) for n in names)]
    messages = [[{"role": "user", "content": p}] for p in prompts]
    outs = engine.generate([m for _ in loras for m in messages],
                           SamplingParams(max_tokens=max_tokens, temperature=0.0),
                           lora_request=[lr for lr in loras for _ in messages], use_tqdm=False)
    texts = [o.outputs[0].text.strip() for o in outs]
    keys = [None, *names]
    return {k: texts[i * len(prompts):(i + 1) * len(prompts)] for i, k in enumerate(keys)}


def score(texts: list[str], check) -> float:
    """Fraction of answers that pass ``check``."""
    return sum(map(check, texts)) / len(texts)
