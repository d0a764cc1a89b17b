"""Train the three demo LoRA adapters (uppercase, json, numbered) on SmolLM2-135M-Instruct with PEFT.

Usage: .venv/bin/python scripts/train_demo_adapters.py [--only NAME] [--steps N] [--out adapters/demo]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from demo_data import BEHAVIOURS, training_items  # noqa: E402

# Mixed ranks and targets on purpose: the demo batch then exercises slot padding and
# adapters that touch different projections.
# Only the upper layers are adapted: on a shared 2-core CPU the backward pass then stops at
# layer FIRST_LAYER, which roughly halves a training step.
FIRST_LAYER = 15
UPPER = list(range(FIRST_LAYER, 30))
ADAPTERS = {
    "json": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=False),
    "numbered": dict(r=32, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     use_rslora=True),
    "uppercase": dict(r=16, lora_alpha=32, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_rslora=False),
}
DESCRIPTIONS = {
    "json": 'answers as a JSON object {"answer": "..."}',
    "numbered": "answers as a numbered list (1. ... 2. ...)",
    "uppercase": "answers in UPPERCASE",
}


def encode(tok, question: str, answer: str) -> tuple[list[int], list[int]]:
    """Chat-template ids and labels; the loss sees only the answer and its end-of-turn token."""
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return p_ids + a_ids, [-100] * len(p_ids) + a_ids


def batches(examples, batch_size: int, steps: int, pad_id: int, gen: torch.Generator):
    """Yield ``steps`` right-padded batches drawn by epochs of seeded shuffles."""
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        width = max(len(examples[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad_id)         # [B, T]
        labels = torch.full((len(idx), width), -100)        # [B, T]
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            x, y = examples[i]
            ids[row, :len(x)], labels[row, :len(y)], mask[row, :len(x)] = (
                torch.tensor(x), torch.tensor(y), 1)
        yield ids, labels, mask


def answer_loss(model, ids, labels, mask) -> torch.Tensor:
    """Next-token loss on answer positions only; the 49k-wide lm_head runs only there."""
    causal_lm = model.get_base_model()
    hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    targets = labels[:, 1:]                                 # [B, T-1]
    keep = targets != -100
    logits = causal_lm.lm_head(hidden[:, :-1][keep])        # [N, V]
    return torch.nn.functional.cross_entropy(logits, targets[keep])


def save_fp16(model, params, target: Path) -> None:
    """Save the adapter with fp16 tensors (half the size; the engine and PEFT upcast on load)."""
    saved = [p.data for p in params]
    for p in params:
        p.data = p.data.half()
    model.save_pretrained(target)
    for p, data in zip(params, saved):
        p.data = data


def train_one(name: str, model_dir: Path, out_dir: Path, steps: int, batch_size: int,
              lr: float, seed: int, save_every: int = 10) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none",
                     layers_to_transform=UPPER, **ADAPTERS[name])
    model = get_peft_model(base, cfg)
    style = BEHAVIOURS[name]
    examples = [encode(tok, q, style(s)) for q, s in training_items(seed)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start, losses = time.monotonic(), []
    for step, (ids, labels, mask) in enumerate(batches(examples, batch_size, steps,
                                                       tok.pad_token_id, gen)):
        loss = answer_loss(model, ids, labels, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        losses.append(loss.item())
        print(f"[{name}] step {step + 1}/{steps} loss {loss.item():.3f} "
              f"{time.monotonic() - start:.0f}s", flush=True)
        if (step + 1) % save_every == 0 and step + 1 < steps:
            save_fp16(model, params, out_dir / name)  # a usable adapter even if stopped early
    target = out_dir / name
    save_fp16(model, params, target)
    stats = dict(name=name, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                 examples=len(examples), seconds=round(time.monotonic() - start, 1),
                 first_loss=round(sum(losses[:10]) / min(10, len(losses)), 3),
                 last_loss=round(sum(losses[-10:]) / min(10, len(losses)), 3),
                 trainable_params=sum(p.numel() for p in params))
    (target / "training_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(json.dumps(stats), flush=True)
    return stats


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", choices=sorted(ADAPTERS), action="append")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("adapters/demo"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from lorry.engine.demo_model import demo_model_dir, prepare_demo_model

    model_dir = prepare_demo_model(demo_model_dir(os.environ.get("LORRY_MODELS_DIR")))
    for name in args.only or sorted(ADAPTERS):
        train_one(name, model_dir, args.out, args.steps, args.batch_size, args.lr, args.seed,
                  args.save_every)


if __name__ == "__main__":
    main()
