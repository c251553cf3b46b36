"""Evaluation of causal LMs: exact-match accuracy of greedy answers, per task, and eval loss.

Exact match compares the stripped generated text with the reference answer (the last
assistant turn of a record). Chain-of-thought answers ("... Answer: 36") are compared by their final
answers: the text after the last answer marker, in the generation and in the reference alike
(a text without the marker counts whole, so "Answer: 36" matches a reference "36"). The prompt is rendered with the same chat template as training.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from .errors import MMTuneError


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
    from .data.formats import detect_format, normalize

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


def load_model_and_template(model_dir: str, adapter_dir: str | None = None, template: str = "auto"):
    """``(model, tokenizer, template)`` for inference. With ``template="auto"`` the template a
    training run recorded in its checkpoint's meta.json is used, so inference renders prompts
    exactly as training did."""
    from .chat import load_for_chat
    from .data.templates import get_template
    from .export import find_checkpoint, read_meta

    model, tokenizer = load_for_chat(model_dir, adapter_dir)
    if template == "auto":
        for cand in (adapter_dir, model_dir):
            ckpt = find_checkpoint(Path(str(cand))) if cand and Path(str(cand)).is_dir() else None
            if ckpt is not None:
                template = read_meta(ckpt).get("template", "auto")
                break
    return model, tokenizer, get_template(template, tokenizer)


def eval_recipe(recipe, checkpoint: str | None = None, max_new_tokens: int = 32) -> dict:
    """`mmtune eval`: exact match on the recipe's eval sources, per task; for a DPO recipe also
    the held-out preference accuracy (``pairs/...``), exact match then scoring the chosen answers."""
    from .data.sources import iter_raw
    from .train.run import is_encoder_objective

    if is_encoder_objective(recipe.objective):
        from .encoders.run import eval_encoder

        return eval_encoder(recipe, checkpoint=checkpoint)
    target = checkpoint or str(Path(recipe.train.output_dir) / "final")
    if not Path(target).exists():
        raise MMTuneError(f"nothing to evaluate at {target}: train first or pass --checkpoint DIR")
    if not recipe.data.eval_sources:
        raise MMTuneError("the recipe has no data.eval_sources to evaluate on")
    model, tokenizer, template = load_model_and_template(target, None, recipe.data.template)
    records = []  # raw records: they keep their `task` field for per-task scores
    for src in recipe.data.eval_sources:
        for i, (_line, raw, err) in enumerate(iter_raw(src.path, recipe.train.seed)):
            if src.max_records is not None and i >= src.max_records:
                break
            if err is not None:
                raise err
            records.append(raw)
    pref = {}
    if recipe.objective == "dpo":
        pref, records = _preference_eval(recipe, model, tokenizer, template, records)
    metrics = pref | exact_match(model, tokenizer, template, records, max_new_tokens, recipe.data.answer_marker)
    metrics.pop("examples", None)
    return metrics


def _preference_eval(recipe, model, tokenizer, template, raw_pairs: list[dict]) -> tuple[dict, list[dict]]:
    """Held-out preference accuracy of a DPO run (the reference: the adapters disabled, or the
    recipe's starting model for full fine-tuning), and the pairs as records whose answer is the
    chosen one, for exact match."""
    from .data.preference import load_eval_pairs, parse_pair, preference_accuracy
    from .train.dpo import has_adapters

    ref_model = None
    if not has_adapters(model):
        from transformers import AutoModelForCausalLM

        from .models.loading import resolve_model_path

        ref_model = AutoModelForCausalLM.from_pretrained(resolve_model_path(recipe.model.path)).eval()
        ref_model.to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs = load_eval_pairs(recipe.data, template, recipe.train.seed)
    pref = preference_accuracy(model, pairs, pad, recipe.dpo.beta, ref_model=ref_model)
    pref = {f"pairs/{k}": v for k, v in pref.items()}
    records = []
    for raw in raw_pairs:
        prompt, chosen, _ = parse_pair(raw)
        records.append({"messages": [*prompt, {"role": "assistant", "content": chosen}],
                        "task": raw.get("task", "all")})
    return pref, records
