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


def _phi4_reference_tower(siglip_path):
    """transformers' Phi-4 vision model (what Phi4MultimodalImageEmbedding runs, with the patch
    attention mask) holding the tiny SigLIP tower's weights."""
    from transformers.models.phi4_multimodal.configuration_phi4_multimodal import Phi4MultimodalVisionConfig
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalVisionModel

    siglip = load_vision_model(siglip_path).eval()
    c = siglip.config
    cfg = Phi4MultimodalVisionConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                                     num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                                     image_size=c.image_size, patch_size=c.patch_size, crop_size=c.image_size)
    ref = Phi4MultimodalVisionModel(cfg).eval()
    state = {k.removeprefix("vision_model."): v for k, v in siglip.state_dict().items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.startswith("head.")] and not unexpected
    return ref


def test_patch_mask_matches_phi4_vision_attention_on_a_padded_crop(towers):
    """A padded crop: the tower with the Phi-4 tiler's patch mask equals transformers'
    Phi4MultimodalVisionModel(patch_attention_mask) at the feature layer, padding masked as keys
    and the content's positions bucketed as Phi-4 does. Without the mask it attends over the
    white padding and differs."""
    from PIL import Image

    from mmtune.multimodal.tiling import phi4_crops

    ref = _phi4_reference_tower(towers["siglip"])
    tower = VisionTower.from_pretrained(towers["siglip"], feature_layer=-2).eval()
    g = torch.Generator().manual_seed(0)
    # 100x37 px on 56 px crops: a 2x1 grid, resized to 112x41, 15 px of white below -> 1 patch row masked
    image = Image.fromarray((torch.rand(37, 100, 3, generator=g) * 255).to(torch.uint8).numpy())
    tiled = phi4_crops(image, crop_size=56, patch_size=14)
    assert tiled.grid == (1, 2) and tiled.patch_mask.shape == (3, 4, 4)
    assert tiled.patch_mask[:2, -1].logical_not().all() and tiled.patch_mask[:2, :-1].all() and tiled.patch_mask[2].all()
    pixels = tiled.pixel_values()  # (3, 3, 56, 56): two padded crops + the global view
    with torch.no_grad():
        expected = ref(pixels, patch_attention_mask=tiled.patch_mask, output_hidden_states=True).hidden_states[-2]
        ours = tower(pixels, patch_mask=tiled.patch_mask)  # (3, 4, 4, C)
        unmasked = tower(pixels)
    expected = expected.reshape(ours.shape)
    diff = (ours - expected).abs().max().item()
    assert diff < 1e-5, diff  # measured 0.0 (the same ops)
    assert (unmasked - expected)[:2].abs().max() > 1e-1  # measured 1.89 max, 0.45 mean: padding attended to
    assert torch.allclose(unmasked[2], expected[2], atol=1e-5)  # no padding in the global view: same either way


def test_patch_mask_positions_and_errors(towers):
    from mmtune.multimodal.vision import phi4_patch_position_ids

    full = torch.ones(1, 4, 4, dtype=torch.bool)
    assert phi4_patch_position_ids(full, 4).tolist() == [list(range(16))]  # unpadded: the identity
    top = full.clone()
    top[:, 2:] = False  # 2 content rows are spread over the 4 rows of the table: rows 0 and 2
    assert phi4_patch_position_ids(top, 4).reshape(4, 4)[:2].tolist() == [[0, 1, 2, 3], [8, 9, 10, 11]]
    with pytest.raises(ConfigError, match="needs a SigLIP vision tower"):
        VisionTower.from_pretrained(towers["clip"])(torch.zeros(1, 3, 56, 56), patch_mask=full)
    with pytest.raises(ConfigError, match=r"patch_mask has shape \(1, 4, 4\), expected \(2, 4, 4\)"):
        VisionTower.from_pretrained(towers["siglip"])(torch.zeros(2, 3, 56, 56), patch_mask=full)
