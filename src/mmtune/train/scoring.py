"""Scoring generated answers: batched greedy answers and exact match, overall and per task.

Exact match compares the stripped generated text with the reference answer (the last
assistant turn of a record). Chain-of-thought answers ("... Answer: 36") are compared by their final
answers: the text after the last answer marker, in the generation and in the reference alike
(a text without the marker counts whole, so "Answer: 36" matches a reference "36"). The prompt is
rendered with the same chat template as training. Used by the loop's sample generations, the
continual benchmarks and ``mmtune eval`` (:mod:`mmtune.evaluation`).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from ..data.formats import detect_format, normalize
from ..errors import MMTuneError


def normalize_answer(s: str) -> str:
    return " ".join(s.strip().split()).rstrip(".").lower()


@torch.no_grad()
def greedy_answers(model, tokenizer, template, prompts: list[list[dict]], max_new_tokens: int = 32,
                   batch_size: int = 32) -> list[str]:
    """Greedy completions for a list of conversations (each ending with a user turn), batched
    with left padding."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = list(template.stop_token_ids)
    outs: list[str] = []
    for i in range(0, len(prompts), batch_size):
        ids = [list(template.prompt_ids(m)) for m in prompts[i:i + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, width - len(x):] = torch.tensor(x)
            mask[r, width - len(x):] = 1
        gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad)
        for r in range(len(ids)):
            new = gen[r, width:].tolist()
            cut = next((j for j, t in enumerate(new) if t in stops), len(new))
            outs.append(tokenizer.decode(new[:cut], skip_special_tokens=True))
    return outs


def final_answer(text: str, marker: str | None) -> str:
    """The text after the last ``marker`` (the whole text when it has none)."""
    return text.rsplit(marker, 1)[1] if marker and marker in text else text


def exact_match(model, tokenizer, template, records: list[dict], max_new_tokens: int = 32,
                answer_marker: str | None = "Answer:") -> dict:
    """Exact-match accuracy over records (alpaca / sharegpt / messages), overall and per ``task``."""

    prompts, refs, tasks = [], [], []
    for rec in records:
        sample = rec if "messages" in rec else normalize(rec, detect_format(rec))
        msgs = sample.get("messages", [])
        if not msgs or msgs[-1]["role"] != "assistant":
            continue
        prompts.append(msgs[:-1])
        refs.append(msgs[-1]["content"])
        tasks.append(rec.get("task", "all"))
    if not prompts:
        raise MMTuneError("no eval record ends with an assistant answer to compare against")
    answers = greedy_answers(model, tokenizer, template, prompts, max_new_tokens)
    hits: dict[str, list[int]] = defaultdict(list)
    for a, r, t in zip(answers, refs, tasks):
        if answer_marker:
            a, r = final_answer(a, answer_marker), final_answer(r, answer_marker)
        ok = int(normalize_answer(a) == normalize_answer(r))
        hits[t].append(ok)
        hits["all"].append(ok) if t != "all" else None
    result = {f"exact_match/{t}": sum(v) / len(v) for t, v in sorted(hits.items()) if t != "all"}
    result["exact_match"] = sum(hits["all"]) / len(hits["all"])
    result["n"] = len(hits["all"])
    result["examples"] = [{"prompt": p[-1]["content"], "answer": a, "reference": r}
                          for p, a, r in list(zip(prompts, answers, refs))[:5]]
    return result
