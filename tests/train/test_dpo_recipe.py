"""The shipped `dpo` recipe on the tiny model raises held-out preference accuracy and exact match.

Measured (2 cores, 600 steps of 32 pairs, ~140 s after the one-time build of
builtin:tiny-pretrained): held-out log-prob preference accuracy 0.489 -> 0.589, reward accuracy
(policy vs reference) 0.0 -> 0.628, exact match 0.0% -> 34.4% (reverse 0% -> 100%); with
train.seed=1: 0.639, 0.678, 32.8%. Plain DPO from the same start (sft_weight 0; 800 steps of 16
pairs) fell to log-prob preference accuracy 0.361 and 0% exact match (degenerate repetitions
such as "15 15 15"): see the recipe.
"""

import pytest

from mmtune.config import load_recipe


def _scores(model, tok, template, eval_pairs):
    from mmtune.data.builtin import builtin_records
    from mmtune.data.preference import preference_accuracy
    from mmtune.evaluation import exact_match

    pa = preference_accuracy(model, eval_pairs, tok.pad_token_id)  # reference: adapters disabled
    records = [{"instruction": r["prompt"], "output": r["chosen"], "task": r["task"]}
               for r in builtin_records("prefs-eval")]
    em = exact_match(model, tok, template, records, max_new_tokens=12)
    return pa, em


@pytest.mark.slow
def test_dpo_recipe_improves_preferences(tmp_path):
    from mmtune.data.preference import build_preference_datasets
    from mmtune.data.templates import get_template
    from mmtune.models.loading import load_model, load_tokenizer, resolve_model_path
    from mmtune.train.run import run_recipe

    recipe = load_recipe("dpo", [f"train.output_dir={tmp_path}", "train.progress=false"])
    tok = load_tokenizer(resolve_model_path(recipe.model.path))
    template = get_template("auto", tok)
    _, eval_pairs, _ = build_preference_datasets(recipe.data, template)
    model = load_model(recipe.model, recipe.adapter)  # the starting point: LoRA B = 0
    pa0, em0 = _scores(model, tok, template, eval_pairs)
    res = run_recipe(recipe, log=lambda *a: None)
    pa1, em1 = _scores(res["trainer"].model, tok, template, eval_pairs)
    print(f"log-prob preference accuracy {pa0['logp_preference_accuracy']:.3f} -> "
          f"{pa1['logp_preference_accuracy']:.3f}; reward accuracy {pa0['preference_accuracy']:.3f} -> "
          f"{pa1['preference_accuracy']:.3f}; exact match {em0['exact_match']:.3f} -> {em1['exact_match']:.3f}")
    assert pa1["logp_preference_accuracy"] >= pa0["logp_preference_accuracy"] + 0.05
    assert pa1["preference_accuracy"] >= 0.55
    assert em0["exact_match"] <= 0.05
    assert em1["exact_match/reverse"] >= 0.8 and em1["exact_match"] >= em0["exact_match"] + 0.25
