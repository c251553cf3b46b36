"""The shipped `dpo` recipe on the tiny model raises held-out preference accuracy and exact match."""

import pytest

from mmtune.config import load_recipe


def _scores(model, tok, template, eval_pairs):
    from mmtune.data.builtin import builtin_records
    from mmtune.data.preference import preference_accuracy
    from mmtune.evaluation import exact_match

    pa = preference_accuracy(model, eval_pairs, tok.pad_token_id)
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
    model = res["trainer"].model
    pa1, em1 = _scores(model, tok, template, eval_pairs)
    print(f"preference accuracy {pa0['logp_preference_accuracy']:.3f} -> {pa1['logp_preference_accuracy']:.3f}; "
          f"reward accuracy -> {pa1['preference_accuracy']:.3f}; exact match {em0['exact_match']:.3f} -> "
          f"{em1['exact_match']:.3f} ({em1})")
    assert pa1["preference_accuracy"] > 0.8
    assert pa1["logp_preference_accuracy"] > pa0["logp_preference_accuracy"] + 0.2
    assert em1["exact_match"] > em0["exact_match"]
