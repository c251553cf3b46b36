"""Recipe schema: every shipped recipe validates; bad keys and values name the key and the options."""

import pytest

from mmtune.config import (
    Recipe,
    apply_overrides,
    list_recipes,
    load_recipe,
    resolve_recipe_path,
    validate_recipe,
)
from mmtune.errors import ConfigError


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_validates(name):
    path = resolve_recipe_path(name)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# mmtune "), f"{name}: first line must give the command that runs it"
    assert name in first or "mmtune demo" in first
    load_recipe(name)


def test_core_recipes_shipped():
    assert {"quickstart", "sft-lora", "sft-qlora", "sft-full", "pretrain"} <= set(list_recipes())


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(ConfigError) as e:
        validate_recipe({"train": {"lrr": 1e-3}}, "my.yaml")
    msg = str(e.value)
    assert "my.yaml" in msg and "train.lrr" in msg and "Did you mean 'lr'" in msg


def test_bad_literal_lists_allowed_values():
    with pytest.raises(ConfigError) as e:
        validate_recipe({"train": {"scheduler": "cosin"}}, "r.yaml")
    msg = str(e.value)
    assert "train.scheduler" in msg and "'linear'" in msg and "Did you mean 'cosine'" in msg


def test_unknown_objective():
    with pytest.raises(ConfigError, match="unknown objective 'sfft'.*Did you mean 'sft'"):
        validate_recipe({"objective": "sfft"})


def test_overrides_are_dotted_and_typed():
    d = apply_overrides({"train": {"lr": 1.0}, "data": {"sources": [{"path": "a"}]}},
                        ["train.lr=1e-4", "train.max_steps=5", "data.sources.0.path=b.jsonl", "data.packing=false"])
    r = validate_recipe(d)
    assert r.train.lr == 1e-4 and r.train.max_steps == 5 and r.data.sources[0].path == "b.jsonl"
    assert r.data.packing is False


def test_override_needs_equals():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])


def test_missing_recipe_one_line():
    with pytest.raises(ConfigError, match="no recipe file 'quickstrat'.*Did you mean 'quickstart'"):
        load_recipe("quickstrat")


def test_invalid_yaml_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml:"):
        load_recipe(str(p))


def test_defaults():
    r = Recipe()
    assert r.adapter.targets == "all-linear" and r.data.loss_on == "assistant" and r.data.packing
