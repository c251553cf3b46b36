"""Evaluation of causal LMs: exact-match accuracy of greedy answers, per task, and eval loss.

Exact match compares the stripped generated text with the reference answer (the last
assistant turn of a record). Chain-of-thought answers ("... Answer: 36") are compared by their final
answers: the text after the last answer marker, in the generation and in the reference alike
(a text without the marker counts whole, so "Answer: 36" matches a reference "36"). The prompt is rendered with the same chat template as training.
"""

from __future__ import annotations

from pathlib import Path

from .data.preference import load_eval_pairs, parse_pair
from .data.sources import iter_raw
from .data.templates import get_template
from .errors import MMTuneError
from .export import find_checkpoint, read_meta
from .models.loading import resolve_model_path
from .models.trained import load_for_chat
from .train.dpo import has_adapters, preference_accuracy
from .train.objectives import objective_data
from .train.scoring import exact_match, final_answer, greedy_answers, normalize_answer  # noqa: F401
from .workflows.run import eval_recipe as _eval


def load_model_and_template(model_dir: str, adapter_dir: str | None = None, template: str = "auto"):
    """``(model, tokenizer, template)`` for inference. With ``template="auto"`` the template a
    training run recorded in its checkpoint's meta.json is used, so inference renders prompts
    exactly as training did."""
    model, tokenizer = load_for_chat(model_dir, adapter_dir)
    if template == "auto":
        for cand in (adapter_dir, model_dir):
            ckpt = find_checkpoint(Path(str(cand))) if cand and Path(str(cand)).is_dir() else None
            if ckpt is not None:
                template = read_meta(ckpt).get("template", "auto")
                break
    return model, tokenizer, get_template(template, tokenizer)


def eval_recipe(recipe, checkpoint: str | None = None, max_new_tokens: int = 32) -> dict:
    """`mmtune eval`: the recipe's workflow evaluates its trained model (or ``checkpoint``); see
    :func:`eval_causal` for causal LMs."""
    return _eval(recipe, checkpoint=checkpoint, max_new_tokens=max_new_tokens)


def eval_causal(recipe, checkpoint: str | None = None, max_new_tokens: int = 32) -> dict:
    """Exact match on a causal recipe's eval sources, per task; for an objective trained on pairs
    (DPO) also the held-out preference accuracy (``pairs/...``), exact match then scoring the
    chosen answers."""
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
    if recipe.objective == "pretrain":  # plain text: nothing to answer, the held-out loss
        return text_loss(model, tokenizer, records, recipe.data.max_length)
    pref = {}
    if objective_data(recipe.objective) == "pairs":
        pref, records = _preference_eval(recipe, model, tokenizer, template, records)
    metrics = pref | exact_match(model, tokenizer, template, records, max_new_tokens, recipe.data.answer_marker)
    metrics.pop("examples", None)
    return metrics


def text_loss(model, tokenizer, records: list[dict], max_length: int) -> dict:
    """Held-out loss of a continued-pretraining run: the mean next-token cross-entropy over the
    tokens of every record's ``text`` (each record alone, truncated at ``max_length``; BOS as the
    tokenizer adds it), and its perplexity."""
    import math

    import torch

    texts = [r.get("text") for r in records]
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise MMTuneError("continued-pretraining eval needs records with a non-empty `text` field")
    total, count = 0.0, 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt").input_ids.to(device)
            if ids.shape[1] < 2:
                continue
            n = ids.shape[1] - 1
            total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * n
            count += n
    if count == 0:
        raise MMTuneError("no eval record has two tokens or more to score")
    loss = total / count
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def _preference_eval(recipe, model, tokenizer, template, raw_pairs: list[dict]) -> tuple[dict, list[dict]]:
    """Held-out preference accuracy of a DPO run (the reference: the adapters disabled, or the
    recipe's starting model for full fine-tuning), and the pairs as records whose answer is the
    chosen one, for exact match."""
    ref_model = None
    if not has_adapters(model):
        from transformers import AutoModelForCausalLM

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
