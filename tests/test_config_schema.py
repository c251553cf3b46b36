"""The recipe schema is a leaf: importable and usable without torch; names are checked through
lazy registry entries; `workflow:` is inferred for every shipped recipe and checked when given."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mmtune.config import WORKFLOW_NAMES, list_recipes, load_recipe
from mmtune.errors import ConfigError
from mmtune.registry import OBJECTIVES, PROJECTORS, Registry


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_config_does_not_import_torch():
    res = _run("import sys, time; t = time.perf_counter(); import mmtune.config; "
               "dt = time.perf_counter() - t; import json; "
               "print(json.dumps({'torch': 'torch' in sys.modules, 'pydantic': 'pydantic' in sys.modules, 's': dt}))")
    assert res["pydantic"] and not res["torch"]


def test_validating_causal_encoder_and_multimodal_recipes_imports_no_torch():
    """Objective and projector names come from lazy entries: no module defining them is imported."""
    names = [n for n in list_recipes() if not n.startswith("continual")]  # strategies parse their settings
    res = _run("import sys, json; from mmtune.config import load_recipe; "
               f"wf = {{n: load_recipe(n).resolved_workflow for n in {names!r}}}; "
               "print(json.dumps({'torch': 'torch' in sys.modules, 'wf': wf, 'mods': sorted(m for m in sys.modules "
               "if m.startswith(('mmtune.train', 'mmtune.multimodal.projectors', 'mmtune.encoders.objectives')))}))")
    assert not res["torch"] and res["mods"] == []
    assert set(res["wf"].values()) == {"causal", "encoder", "multimodal"}


def test_every_shipped_recipe_infers_its_workflow():
    got = {n: load_recipe(n).resolved_workflow for n in list_recipes()}
    for name, wf in got.items():
        expect = ("multimodal" if name.startswith("mm-") else "continual" if name.startswith("continual")
                  else "encoder" if load_recipe(name).encoder is not None else "causal")
        assert wf == expect, name
        assert load_recipe(name, [f"workflow={wf}"]).resolved_workflow == wf  # stating it changes nothing
    assert set(got.values()) == set(WORKFLOW_NAMES)


@pytest.mark.parametrize("name,override,match", [
    ("quickstart", "workflow=encoder", "workflow: encoder needs an encoder objective"),
    ("encoder-classify", "workflow=causal", "workflow: causal needs"),
    ("quickstart", "workflow=multimodal", "workflow: multimodal needs a `multimodal` section"),
    ("quickstart", "workflow=pipeline", "'workflow' = 'pipeline' is not allowed"),
    ("quickstart", "dpo.beta=0.2", "'dpo' settings are read by objective dpo only"),
    ("quickstart", "encoder.pooling=mean", "'encoder' is not read by causal recipes"),
    ("mm-phi4-speech", "objective=mlm", "not available for multimodal recipes"),
    ("mm-phi4-speech", "model.freeze=['x.*']", "'model.freeze' is not read by multimodal recipes"),
    ("continual-digits", "data.sources=[{path: a.jsonl}]", "continual.tasks"),
    ("electra", "adapter.type=lora", "electra trains generator and discriminator in full"),
    ("quickstart", "objective=sftt", "unknown objective 'sftt'.*Did you mean 'sft'"),
])
def test_cross_field_rules_are_validation_errors(name, override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_recipe(name, [override])
    assert "\n" not in str(e.value) and "(got {" not in str(e.value)  # one line, no dump of the recipe


def test_lazy_registry_entries():
    reg = Registry("thing", lazy={"json-ish": "json"})
    assert "json-ish" in reg and reg.names() == ["json-ish"]
    assert reg.check("json-ish") == "json-ish"
    with pytest.raises(ConfigError, match="unknown thing 'jsn'; valid: json-ish"):
        reg.check("jsn")
    with pytest.raises(ConfigError, match="importing json did not register it"):
        reg.get("json-ish")  # the module exists but registers nothing under that name
    reg.register("eager")(dict)
    assert reg.names() == ["eager", "json-ish"] and reg.get("eager") is dict


def test_lazy_entries_resolve_to_the_registered_builders():
    from mmtune.multimodal.projectors import PROJECTORS as defined_there
    from mmtune.train.objectives import OBJECTIVES as objectives_there

    assert defined_there is PROJECTORS and objectives_there is OBJECTIVES
    assert OBJECTIVES.get("dpo").__name__ == "DPOObjective"
    OBJECTIVES.load_all()
    assert set(OBJECTIVES._items) == set(OBJECTIVES.names())  # every lazy name is really registered
    PROJECTORS.load_all()
    assert set(PROJECTORS._items) == set(PROJECTORS.names())


def test_a_saved_recipe_validates_again():
    """A run saves its recipe with every field written out (defaults included); reading it back
    must not count those defaults as settings the workflow would ignore."""
    from mmtune.config import validate_recipe

    for name in list_recipes():
        recipe = load_recipe(name)
        assert validate_recipe(recipe.model_dump(mode="json")) == recipe, name
