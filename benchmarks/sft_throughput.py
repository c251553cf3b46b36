"""LoRA SFT throughput: mmtune (packed rows) vs a plain transformers + PEFT loop (padded batches).

Both run in this one process on the same tiny model, the same tokenized samples (one epoch,
same order seed), the same LoRA config, optimizer and LR; the batch sizes are chosen so that
both see about the same number of real tokens per optimizer step (so about the same number of
steps). Prints real (non-pad) tokens/s for both, their ratio, and the held-out loss of both
(computed by the same function) to show the speed-up costs nothing in quality.

    python benchmarks/sft_throughput.py            # ~3-5 minutes on 2 CPU cores
    python benchmarks/sft_throughput.py --samples 400 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmtune.config import AdapterConfig, TrainConfig  # noqa: E402
from mmtune.data.builtin import corpus, instruction_mix  # noqa: E402
from mmtune.data.packing import collate_packed, pack_examples  # noqa: E402
from mmtune.data.templates import get_template  # noqa: E402
from mmtune.train.loop import Trainer  # noqa: E402
from mmtune.train.objectives import CausalLMObjective, shifted_token_loss  # noqa: E402


def make_samples(n: int, seed: int, template, max_len: int) -> list[dict]:
    """Instruction samples with a context of log-normal length (median ~100 tokens), as in
    real SFT data: most are short, a few are long (the case that makes padding expensive)."""
    rng = random.Random(seed)
    docs = corpus(2000, seed)
    items = instruction_mix("train", n // 3 + 1, seed)
    out = []
    for i in range(n):
        k = max(0, min(40, int(math.exp(rng.gauss(math.log(5), 0.8)))))
        ctx = " ".join(rng.choice(docs) for _ in range(k))
        it = items[i % len(items)]
        msgs = [{"role": "user", "content": (f"Context: {ctx}\n\n" if ctx else "") + it["instruction"]},
                {"role": "assistant", "content": it["output"]}]
        ids, labels = template.encode(msgs)
        if len(ids) <= max_len:
            out.append({"input_ids": ids, "labels": labels})
    return out


def eval_loss(model, examples, pad_id) -> float:
    model.eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            loss, n = shifted_token_loss(model(input_ids=ids).logits, torch.tensor([ex["labels"]]))
            tot, cnt = tot + float(loss), cnt + int(n)
    model.train()
    return tot / cnt


def load_base(path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def run_mmtune(path, train, evals, pad_id, args) -> dict:
    from mmtune.models.adapters import apply_adapter

    model = apply_adapter(load_base(path), AdapterConfig(r=16, alpha=32, dropout=0.0))
    rows = pack_examples(train, args.max_len)
    cfg = TrainConfig(output_dir=str(Path(args.workdir) / "mmtune"), epochs=1, batch_size=args.rows, lr=args.lr,
                      warmup_steps=5, scheduler="constant", progress=False, tensorboard=False, max_grad_norm=1.0)
    tr = Trainer(model, CausalLMObjective(), rows, lambda b: collate_packed(b, pad_id), cfg)
    t0 = time.perf_counter()
    while tr.step < tr.total_steps:
        tr.train_step()
    dt = time.perf_counter() - t0
    real = sum(len(e["input_ids"]) for e in train)
    return {"system": "mmtune (packed)", "steps": tr.step, "seconds": dt, "tokens_per_s": real / dt,
            "eval_loss": eval_loss(model, evals, pad_id), "padding": 1 - real / (len(rows) * args.max_len)}


def run_baseline(path, train, evals, pad_id, args) -> dict:
    """What a user writes with transformers + PEFT: padded batches, model(**batch).loss."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_base(path), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    bs = args.batch
    steps, padded = 0, 0
    model.train()
    t0 = time.perf_counter()
    for i in range(0, len(order), bs):
        batch = [train[j] for j in order[i:i + bs]]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), pad_id)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for r, e in enumerate(batch):
            n = len(e["input_ids"])
            ids[r, :n], mask[r, :n], labels[r, :n] = torch.tensor(e["input_ids"]), 1, torch.tensor(e["labels"])
        padded += ids.numel()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    dt = time.perf_counter() - t0
    real = sum(len(e["input_ids"]) for e in train)
    return {"system": "transformers+PEFT (padded)", "steps": steps, "seconds": dt, "tokens_per_s": real / dt,
            "eval_loss": eval_loss(model, evals, pad_id), "padding": 1 - real / padded}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=600, help="training samples (one epoch)")
    ap.add_argument("--max-len", type=int, default=512, help="packed row length / max sample length")
    ap.add_argument("--rows", type=int, default=4, help="mmtune: packed rows per step")
    ap.add_argument("--batch", type=int, default=16, help="baseline: samples per padded batch")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--workdir", default="runs/bench-sft")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mmtune.models.loading import load_tokenizer
    from mmtune.models.tiny import ensure_tiny

    path = ensure_tiny()
    tok = load_tokenizer(path)
    template = get_template("auto", tok)
    data = make_samples(args.samples + 60, args.seed, template, args.max_len)
    train, evals = data[:-60], data[-60:]
    lengths = sorted(len(e["input_ids"]) for e in train)
    print(f"{len(train)} samples, tokens per sample: median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    results = [run_baseline(path, train, evals, tok.pad_token_id, args),
               run_mmtune(path, train, evals, tok.pad_token_id, args)]
    print("\n| system | steps | seconds | real tokens/s | padding | eval loss |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['system']} | {r['steps']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} | {r['padding']:.1%} | "
              f"{r['eval_loss']:.4f} |")
    ratio = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
    print(f"\nspeed-up (tokens/s, mmtune / baseline): {ratio:.2f}x; eval loss difference "
          f"{results[1]['eval_loss'] - results[0]['eval_loss']:+.4f}")
    out = {"results": results, "ratio": ratio}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
