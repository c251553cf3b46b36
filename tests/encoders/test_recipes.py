"""Encoder recipes: every shipped one validates; tiny runs train, resume exactly, and evaluate."""

import math

import pytest

from mmtune.config import RECIPE_DIR, load_recipe
from mmtune.encoders import ENCODER_OBJECTIVES
from mmtune.encoders.run import eval_encoder, run_encoder_recipe
from mmtune.errors import ConfigError, MMTuneError

ENCODER_RECIPES = ["bert-mlm-nsp", "roberta-mlm", "albert-mlm-sop", "electra", "encoder-classify", "encoder-qa",
                   "encoder-similarity", "minilm-mlm"]
TINY = ["encoder.hidden_size=32", "encoder.num_heads=2", "encoder.intermediate_size=64", "encoder.num_layers=1",
        "encoder.embedding_size=16", "train.progress=false", "train.tensorboard=false", "train.batch_size=8",
        "train.warmup_steps=0", "train.scheduler=constant"]


@pytest.mark.parametrize("name", ENCODER_RECIPES)
def test_shipped_recipe_validates_and_says_how_to_run(name):
    recipe = load_recipe(name)
    assert recipe.objective in ENCODER_OBJECTIVES and recipe.encoder is not None
    first = (RECIPE_DIR / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith(f"# mmtune train {name}")


def _tiny(name, tmp_path, *extra):
    return load_recipe(name, TINY + [f"train.output_dir={tmp_path}", "data.sources.0.max_records=150", *extra])


def test_pretraining_resumes_exactly_with_dynamic_whole_word_masks(tmp_path):
    # ALBERT + SOP + dynamic whole-word masks: every random stream the data path has.
    full = run_encoder_recipe(_tiny("albert-mlm-sop", tmp_path / "a", "train.max_steps=4"))
    v = len(__import__("mmtune.encoders.tokenizer", fromlist=["load_tokenizer"]).load_tokenizer(
        tmp_path / "a" / "final" / "tokenizer"))
    # An untrained model predicts nearly uniformly: MLM ~ ln V, SOP ~ ln 2.
    assert full["losses"][0] == pytest.approx(math.log(v) + math.log(2), rel=0.05)
    run_encoder_recipe(_tiny("albert-mlm-sop", tmp_path / "b", "train.max_steps=2"))
    resumed = run_encoder_recipe(_tiny("albert-mlm-sop", tmp_path / "b", "train.max_steps=4"), resume=True)
    assert resumed["losses"] == pytest.approx(full["losses"], abs=1e-5)
    assert resumed["eval"]["mlm_loss"] == pytest.approx(full["eval"]["mlm_loss"], abs=1e-5)
    assert full["data"]["pairs"] > 0 and full["eval"]["n"] > 0
    again = eval_encoder(full["final_dir"])
    assert again["pair_acc"] == pytest.approx(full["eval"]["pair_acc"])
    assert again["mlm_loss"] == pytest.approx(full["eval"]["mlm_loss"], abs=1e-5)


@pytest.mark.parametrize("objective,source", [("classify", "encoder-topics"), ("qa", "encoder-qa"),
                                              ("similarity_cross", "encoder-sts"), ("similarity_bi", "encoder-sts")])
def test_downstream_runs_and_eval_reproduces_metrics(objective, source, tmp_path):
    recipe = load_recipe("encoder-classify", TINY + [
        f"objective={objective}", "model.path=builtin:bert-tiny", "adapter.type=none",
        f"train.output_dir={tmp_path}", "train.max_steps=3", "data.max_length=48",
        f"data.sources=[{{path: 'builtin:{source}', max_records: 48}}]",
        f"data.eval_sources=[{{path: 'builtin:{source}-eval', max_records: 24}}]"])
    res = run_encoder_recipe(recipe)
    assert len(res["losses"]) == 3 and all(math.isfinite(x) for x in res["losses"])
    metric = {"classify": "accuracy", "qa": "f1", "similarity_cross": "spearman", "similarity_bi": "spearman"}[objective]
    assert metric in res["eval"]
    again = eval_encoder(res["final_dir"])
    assert again[metric] == pytest.approx(res["eval"][metric], abs=1e-6)
    # the exported hf/ directory is a plain transformers model with its tokenizer
    from transformers import AutoModel, AutoTokenizer

    hf = AutoModel.from_pretrained(f"{res['final_dir']}/hf")
    assert hf.config.hidden_size == 32 and len(AutoTokenizer.from_pretrained(f"{res['final_dir']}/hf")) > 0


def test_corpus_without_pairs_is_an_error(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Only one sentence here.\n   \nAnother lonely sentence.\n\n")
    recipe = load_recipe("bert-mlm-nsp", TINY + [f"train.output_dir={tmp_path}", f"data.sources=[{{path: '{corpus}'}}]",
                                                 "data.eval_fraction=0", "encoder.vocab_size=100"])
    with pytest.raises(MMTuneError, match="no training pair for NSP.*too_short_for_pair"):
        run_encoder_recipe(recipe)


def test_wrong_task_for_objective_is_a_config_error(tmp_path):
    recipe = load_recipe("encoder-classify", TINY + [f"train.output_dir={tmp_path}", "model.path=builtin:bert-tiny",
                                                     "adapter.type=none", "objective=qa"])
    with pytest.raises(ConfigError, match="is a classify task"):
        run_encoder_recipe(recipe)


def test_static_mask_copies_give_k_masked_versions_of_each_sequence(tmp_path):
    from mmtune.encoders.run import prepare

    one = prepare(_tiny("bert-mlm-nsp", tmp_path, "data.eval_fraction=0"))
    three = prepare(_tiny("bert-mlm-nsp", tmp_path, "data.eval_fraction=0", "encoder.mask_copies=3"))
    n = len(one.train_rows)
    assert len(three.train_rows) == 3 * n
    assert [r["labels"] for r in three.train_rows[:n]] == [r["labels"] for r in one.train_rows]
    for i in range(0, n, max(1, n // 20)):
        copies = [three.train_rows[c * n + i] for c in range(3)]
        assert all(c["input_ids"] == copies[0]["input_ids"] for c in copies)
        assert len({tuple(c["labels"]) for c in copies}) == 3
    with pytest.raises(ConfigError, match="mask_copies"):
        load_recipe("roberta-mlm", ["encoder.mask_copies=3"])
