"""VisionTower: parity with the transformers model's hidden_states, loading from full CLIP/SigLIP
checkpoints, pruning, and parameter counts of the SigLIP-so400m geometry on the meta device."""

import json

import pytest
import torch

from mmtune.errors import ConfigError
from mmtune.multimodal.vision import (
    VisionTower,
    build_tiny_vision_tower,
    build_vision_config,
    count_parameters,
    load_vision_model,
)

TINY = dict(image_size=56, patch_size=14, hidden=32, layers=3, heads=4)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {
        "siglip": build_tiny_vision_tower(root / "siglip", kind="siglip", **TINY),
        "clip": build_tiny_vision_tower(root / "clip", kind="clip", **TINY),
        "vit": build_tiny_vision_tower(root / "vit", kind="vit", **TINY),
        "siglip_full": build_tiny_vision_tower(root / "siglip_full", kind="siglip", full_model=True, **TINY),
        "clip_full": build_tiny_vision_tower(root / "clip_full", kind="clip", full_model=True, **TINY),
    }


def reference_hidden(path, layer, pixels, drop_cls):
    """hidden_states[layer] of the model loaded straight with transformers."""
    model = load_vision_model(path).eval()
    with torch.no_grad():
        h = model(pixel_values=pixels, output_hidden_states=True).hidden_states[layer]
    return h[:, 1:] if drop_cls else h


@pytest.mark.parametrize("kind,cls_token", [("siglip", False), ("clip", True), ("vit", True)])
@pytest.mark.parametrize("prune", [True, False])
def test_penultimate_features_equal_hidden_states(towers, kind, cls_token, prune):
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 56, 56)
    tower = VisionTower.from_pretrained(towers[kind], feature_layer=-2, prune=prune).eval()
    with torch.no_grad():
        out = tower(pixels)
    assert out.shape == (3, 4, 4, 32)
    ref = reference_hidden(towers[kind], -2, pixels, cls_token)  # (3, 16, 32)
    assert torch.allclose(out.reshape(3, 16, 32), ref, atol=1e-5)
    assert tower.pruned == prune


def test_other_layers_and_full_checkpoints(towers):
    pixels = torch.randn(2, 3, 56, 56)
    tower = VisionTower.from_pretrained(towers["clip"], feature_layer=1).eval()
    with torch.no_grad():
        assert torch.allclose(tower(pixels).reshape(2, 16, 32), reference_hidden(towers["clip"], 1, pixels, True),
                              atol=1e-5)
    for kind in ("siglip", "clip"):
        # the vision half of a full model: its config is picked and its weights are loaded
        from transformers import AutoModel

        full = AutoModel.from_pretrained(towers[f"{kind}_full"]).eval()
        tower = VisionTower.from_pretrained(towers[f"{kind}_full"], feature_layer=-2, prune=False).eval()
        assert tower.model.config.model_type == f"{kind}_vision_model"
        with torch.no_grad():
            ref = full.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
            got = tower(pixels).reshape(2, 16, 32)
        assert torch.allclose(got, ref[:, 1:] if kind == "clip" else ref, atol=1e-5)


def test_pruned_tower_has_no_unused_parameters(towers):
    tower = VisionTower.from_pretrained(towers["siglip"], feature_layer=-2)
    assert len(tower.model.encoder.layers) == 2 and tower.model.config.num_hidden_layers == 2
    names = [n for n, _ in tower.named_parameters()]
    assert not any("post_layernorm" in n or ".head." in n for n in names)
    tower(torch.randn(2, 3, 56, 56)).square().mean().backward()
    assert all(p.grad is not None for p in tower.parameters())
    # unpruned: the last layer, post-LayerNorm and pooling head get no gradient
    full = VisionTower.from_pretrained(towers["siglip"], feature_layer=-2, prune=False)
    full(torch.randn(2, 3, 56, 56)).square().mean().backward()
    unused = {n.split(".")[1] for n, p in full.named_parameters() if p.grad is None}
    assert unused == {"encoder", "post_layernorm", "head"}


def test_image_mean_std_and_other_resolution(towers, tmp_path):
    assert VisionTower.from_pretrained(towers["clip"]).image_mean[0] == pytest.approx(0.48145466)
    assert VisionTower.from_pretrained(towers["siglip"]).image_std == (0.5, 0.5, 0.5)
    tower = VisionTower.from_pretrained(towers["siglip"]).eval()
    with torch.no_grad():
        assert tower(torch.randn(1, 3, 84, 112)).shape == (1, 6, 8, 32)  # position embeddings interpolated


def test_user_errors(towers, tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        VisionTower.from_pretrained(tmp_path / "missing")
    with pytest.raises(ConfigError, match="out of range"):
        VisionTower.from_pretrained(towers["siglip"], feature_layer=-5)
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
         "num_hidden_layers": 1, "intermediate_size": 32, "vocab_size": 10}))
    with pytest.raises(ConfigError, match="not a vision model"):
        VisionTower.from_pretrained(tmp_path / "lm")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "no_such_model"}))
    with pytest.raises(ConfigError, match="cannot be read"):
        VisionTower.from_pretrained(tmp_path / "bad")
    with pytest.raises(ConfigError, match="valid: siglip, clip, vit"):
        build_vision_config("dino")


def so400m_formula(d=1152, mlp=4304, layers=27, patch=14, image=448, head=True, post_norm=True):
    """SigLIP vision tower parameters from its architecture.

    patch embedding conv (3*p*p*d + d) + position embeddings (n_patches*d);
    per layer: 2 LayerNorms (4d) + q,k,v,o with biases (4d^2 + 4d) + MLP (2*d*mlp + mlp + d);
    post-LayerNorm 2d; attention-pooling head: probe d + MultiheadAttention (4d^2 + 4d)
    + LayerNorm 2d + MLP (2*d*mlp + mlp + d).
    """
    n_patches = (image // patch) ** 2
    per_layer = 4 * d + 4 * d * d + 4 * d + 2 * d * mlp + mlp + d
    total = 3 * patch * patch * d + d + n_patches * d + layers * per_layer
    if post_norm:
        total += 2 * d
    if head:
        total += d + 4 * d * d + 4 * d + 2 * d + 2 * d * mlp + mlp + d
    return total


def test_so400m_geometry_parameter_count_on_meta():
    from transformers import SiglipVisionModel

    config = build_vision_config("siglip")  # 448 px, patch 14, 27 layers, 1152 wide, MLP 4304, 16 heads
    assert (config.intermediate_size, config.num_attention_heads) == (4304, 16)
    with torch.device("meta"):
        hf = SiglipVisionModel(config)
        tower = VisionTower.from_config(config, feature_layer=-2)
    assert next(tower.parameters()).device.type == "meta"
    assert count_parameters(hf) == so400m_formula() == 428_565_440
    # penultimate-layer tower: 26 layers, no post-LayerNorm, no pooling head
    assert count_parameters(tower) == so400m_formula(layers=26, head=False, post_norm=False) == 398_085_280
    assert config.num_hidden_layers == 27  # from_config leaves the caller's config alone
