"""Stage trainability: the exact set of trainable parameter names of every stage of every shipped
multimodal recipe, per-component learning rates, and the errors of stages that cannot train."""

import re

import pytest
import torch

from mmtune.config import ModelConfig, load_recipe
from mmtune.errors import ConfigError
from mmtune.multimodal.config import MultimodalConfig
from mmtune.multimodal.model import build_composed_model, load_composed
from mmtune.multimodal.router import Route
from mmtune.multimodal.stages import apply_stage, trainable_names

RECIPES = ("mm-phi4-vision", "mm-phi4-speech", "mm-phi4-vision-speech", "mm-internvl")

# The tiny Llama (4 layers) has 7 linears per layer: q, k, v, o, gate, up, down.
LORA = re.compile(r"language_model\.base_model\.model\.model\.layers\.[0-3]\."
                  r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.lora_([AB])\.(\w+)\.weight")
PHI4_PROJECTOR = ["vision_projector.mlp.0.bias", "vision_projector.mlp.0.weight", "vision_projector.mlp.2.bias",
                  "vision_projector.mlp.2.weight", "vision_projector.newline", "vision_projector.separator"]
INTERNVL_PROJECTOR = ["vision_projector.mlp.0.bias", "vision_projector.mlp.0.weight", "vision_projector.mlp.1.bias",
                      "vision_projector.mlp.1.weight", "vision_projector.mlp.3.bias", "vision_projector.mlp.3.weight"]


def audio_projector(name):
    return [f"{name}.mlp.{i}.{w}" for i in (0, 2) for w in ("bias", "weight")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    out = {}
    for name in RECIPES:
        recipe = load_recipe(name)
        out[name] = (recipe, build_composed_model(recipe.multimodal, ModelConfig(path="builtin:tiny",
                                                                                   dtype="float32"), cache))
    return out


def expected(model, modes: dict, adapter: str | None) -> set[str]:
    """The trainable set derived from the parameter names alone, independently of apply_stage."""
    names = [n for n, _ in model.named_parameters()]
    out = set()
    for comp in ("vision_encoder", "vision_projector", "audio_encoder", "audio_projector", "audio_projector_vs"):
        if modes.get(comp) == "full":
            out |= {n for n in names if n.startswith(comp + ".")}
    if modes.get("llm") == "lora":
        out |= {n for n in names if (m := LORA.fullmatch(n)) and m.group(4) == adapter}
    if modes.get("llm") == "full":
        out |= {n for n in names if n.startswith("language_model.") and ".lora_" not in n}
    return out


@pytest.mark.parametrize("recipe_name", RECIPES)
def test_each_shipped_stage_trains_exactly_its_declared_set(models, recipe_name):
    recipe, model = models[recipe_name]
    for stage in recipe.multimodal.stages:
        plan = apply_stage(model, stage, recipe.train.lr, log_fn=lambda *_: None)
        modes = stage.trainable.model_dump()
        assert plan.trainable == trainable_names(model), stage.name
        assert set(plan.trainable) == expected(model, modes, stage.adapter), stage.name
        assert plan.count == sum(p.numel() for p in model.parameters() if p.requires_grad)
        if modes["llm"] == "lora":  # one adapter: A and B of 28 linears
            lora = [n for n in plan.trainable if n.startswith("language_model.")]
            assert len(lora) == 4 * 7 * 2 and all(LORA.fullmatch(n).group(4) == stage.adapter for n in lora)
        if modes["vision_projector"] == "full":
            proj = [n for n in plan.trainable if n.startswith("vision_projector.")]
            assert proj == (PHI4_PROJECTOR if recipe.multimodal.vision.projector == "phi4_avgpool"
                            else INTERNVL_PROJECTOR)
        for comp in ("audio_projector", "audio_projector_vs"):
            got = [n for n in plan.trainable if n.startswith(comp + ".")]
            assert got == (audio_projector(comp) if modes[comp] == "full" else [])
        # per-component learning rates
        for g in plan.groups:
            assert g["lr"] == stage.lr.get(g["component"], recipe.train.lr)
        assert sorted(g["component"] for g in plan.groups) == sorted(c for c, m in modes.items() if m != "frozen")


def test_phi4_vision_speech_stage_literals(models):
    """The vision-speech stage of the full Phi-4 recipe, spelled out."""
    recipe, model = models["mm-phi4-vision-speech"]
    stage = recipe.multimodal.stages[-1]
    plan = apply_stage(model, stage, recipe.train.lr, log_fn=lambda *_: None)
    assert plan.per_component["audio_encoder"] == plan.per_component["audio_projector"] == 0
    assert [n for n in plan.trainable if n.startswith("audio")] == audio_projector("audio_projector_vs")
    assert "language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.vision.weight" in plan.trainable
    assert "language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.speech.weight" not in plan.trainable
    assert "language_model.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" not in plan.trainable
    # which routes it trains: image (LoRA_V, encoder) and image+audio (+ the vs projector), not audio or text
    assert plan.trains_route(Route("image", "vision", None))
    assert plan.trains_route(Route("image+audio", "vision", "audio_projector_vs"))
    assert not plan.trains_route(Route("audio", "speech", "audio_projector"))
    assert not plan.trains_route(Route("text", None, None))


def _cfg(**stage):
    base = {"vision": {"lora": {"name": "enc", "r": 4, "alpha": 8}}, "audio": {},
            "adapters": [{"name": "vision", "r": 4}],
            "stages": [{"name": "s", "sources": [], **stage}]}
    return MultimodalConfig.model_validate(base)


def test_encoder_lora_trains_only_the_encoder_lora_and_survives_save_load(tmp_path):
    cfg = _cfg(trainable={"vision_encoder": "lora", "audio_encoder": "full"})
    model = build_composed_model(cfg, ModelConfig(path="builtin:tiny", dtype="float32"), tmp_path / "cache")
    plan = apply_stage(model, cfg.stages[0], 1e-3, log_fn=lambda *_: None)
    vis = [n for n in plan.trainable if n.startswith("vision_encoder.")]
    # tiny SigLIP keeps 2 of 3 layers; q, k, v, out_proj, fc1, fc2 per layer, A and B each
    assert len(vis) == 2 * 6 * 2 and all(".lora_A.default." in n or ".lora_B.default." in n for n in vis)
    assert {n for n in plan.trainable if n.startswith("audio_encoder.")} == \
        {n for n, _ in model.named_parameters() if n.startswith("audio_encoder.")}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_()
    model.save(tmp_path / "m")
    loaded = load_composed(tmp_path / "m", device="cpu")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_stages_that_cannot_train_fail_clearly(tmp_path):
    from mmtune.config import validate_recipe

    cfg = _cfg(trainable={})
    model = build_composed_model(cfg, ModelConfig(path="builtin:tiny", dtype="float32"), tmp_path / "cache")
    with pytest.raises(ConfigError, match="trains nothing"):
        apply_stage(model, cfg.stages[0], 1e-3, log_fn=lambda *_: None)

    def recipe(mm):
        return validate_recipe({"multimodal": mm})

    with pytest.raises(ConfigError, match="set `adapter`"):
        recipe({"vision": {}, "adapters": [{"name": "vision"}],
                "stages": [{"name": "s", "sources": [], "trainable": {"llm": "lora"}}]})
    with pytest.raises(ConfigError, match="adapter 'visoin' is not defined. Did you mean 'vision'"):
        recipe({"vision": {}, "adapters": [{"name": "vision"}],
                "stages": [{"name": "s", "sources": [], "trainable": {"llm": "lora"}, "adapter": "visoin"}]})
    with pytest.raises(ConfigError, match="has no audio encoder"):
        recipe({"vision": {}, "stages": [{"name": "s", "sources": [], "trainable": {"audio_encoder": "full"}}]})
    with pytest.raises(ConfigError, match="vision_encoder: lora needs vision.lora"):
        recipe({"vision": {}, "stages": [{"name": "s", "sources": [], "trainable": {"vision_encoder": "lora"}}]})
    with pytest.raises(ConfigError, match="'multimodal.stages.0.trainable.vision_projector' = 'lora' is not allowed"):
        recipe({"vision": {}, "stages": [{"name": "s", "sources": [], "trainable": {"vision_projector": "lora"}}]})
    with pytest.raises(ConfigError, match="lr key 'vision' is not a component"):
        recipe({"vision": {}, "stages": [{"name": "s", "sources": [], "trainable": {"vision_projector": "full"},
                                          "lr": {"vision": 1e-3}}]})
    with pytest.raises(ConfigError, match="phi4_avgpool .* needs tiling: phi4"):
        recipe({"vision": {"tiling": "internvl"}, "stages": [{"name": "s", "sources": []}]})
