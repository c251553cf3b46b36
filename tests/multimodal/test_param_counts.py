"""Parameter counts of our components in Phi-4-multimodal geometry, on the meta device, against
the published figures (docs/reference/multimodal.md#phi-4-multimodal)."""

import pytest
import torch

from mmtune.multimodal.config import PHI4_LORA_TARGETS, MultimodalConfig
from mmtune.multimodal.model import compose, parameter_counts


def phi4_mm_config(max_crops: int = 36) -> MultimodalConfig:
    """Phi-4-multimodal's composition (docs/reference/multimodal.md#phi-4-multimodal) as a config: SigLIP-so400m 448 px,
    penultimate layer, phi4 tiling, phi4_avgpool projector; Phi-4 Conformer; LoRA_V r=256/512/0.0
    and LoRA_A r=320/640/0.01 on qkv_proj, o_proj, gate_up_proj, down_proj; the vision-speech
    projector; a single placeholder stage (for counting and building only)."""
    return MultimodalConfig.model_validate({
        "vision": {"path": "phi4-siglip", "feature_layer": -2, "tiling": "phi4", "crop_size": 448,
                   "max_crops": max_crops, "projector": "phi4_avgpool"},
        "audio": {"encoder": "conformer", "path": "phi4-conformer", "projector": "mlp2x_gelu"},
        "adapters": [{"name": "vision", "r": 256, "alpha": 512, "dropout": 0.0, "targets": PHI4_LORA_TARGETS},
                     {"name": "speech", "r": 320, "alpha": 640, "dropout": 0.01, "targets": PHI4_LORA_TARGETS}],
        "stages": [{"name": "count", "sources": []}],
    })


def phi4_mini_config():
    """transformers ``Phi3Config`` in Phi-4-mini's geometry (docs/reference/multimodal.md#phi-4-multimodal)."""
    from transformers import Phi3Config

    return Phi3Config(hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=200064, tie_word_embeddings=True, partial_rotary_factor=0.75,
                      max_position_embeddings=131072)


def build_phi4_mm_on_meta(max_crops: int = 36):
    """Our components in Phi-4-multimodal geometry on the meta device (no memory): Phi-4-mini LM,
    SigLIP-so400m tower (features of layer -2: 26 of 27 layers kept), Phi-4 Conformer, the
    three projectors and both LoRAs."""
    from transformers import AutoModelForCausalLM

    from mmtune.multimodal.conformer import build_conformer, phi4_conformer_config
    from mmtune.multimodal.vision import VisionTower, build_vision_config

    cfg = phi4_mm_config(max_crops)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(phi4_mini_config())
        vision = VisionTower.from_config(build_vision_config("siglip"), feature_layer=-2)
        audio = build_conformer(phi4_conformer_config(), device="meta")
        return compose(lm, None, cfg, vision_encoder=vision, audio_encoder=audio)


@pytest.fixture(scope="module")
def phi4():
    return build_phi4_mm_on_meta()


def test_lora_and_language_model_counts_match_phi4_mm(phi4):
    counts = parameter_counts(phi4)
    assert counts["adapter/vision"] == 369_098_752  # r 256 x 45,056 x 32 layers
    assert counts["adapter/speech"] == 461_373_440  # r 320 x 45,056 x 32 layers
    assert counts["llm"] == 3_836_021_760  # Phi-4-mini with tied embeddings
    assert all(p.device.type == "meta" for p in phi4.parameters())


def test_adapters_sit_on_the_four_decoder_linears_of_every_layer(phi4):
    lm = phi4.language_model
    per_layer = {}
    for name, p in lm.named_parameters():
        if ".lora_A.vision." in name or ".lora_B.vision." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            module = name.split(".lora_")[0].rsplit(".", 1)[1]
            per_layer.setdefault(layer, {}).setdefault(module, 0)
            per_layer[layer][module] += p.numel()
    assert sorted(per_layer) == list(range(32))
    # r x (in + out): qkv 3072 -> 5120, o 3072 -> 3072, gate_up 3072 -> 16384, down 8192 -> 3072
    assert per_layer[7] == {"qkv_proj": 256 * (3072 + 5120), "o_proj": 256 * 6144, "gate_up_proj": 256 * (3072 + 16384),
                            "down_proj": 256 * (8192 + 3072)}
    assert sum(per_layer[7].values()) == 256 * 45_056


def test_encoders_and_projectors_in_phi4_geometry(phi4):
    counts = parameter_counts(phi4)
    assert counts["audio_encoder"] == 441_204_992  # Conformer, 24 x d 1024 (test_conformer derives it)
    # projectors: Linear(C, 3072) - GELU - Linear(3072, 3072); phi4_avgpool adds newline + separator (C each)
    assert counts["audio_projector"] == counts["audio_projector_vs"] == 1024 * 3072 + 3072 + 3072 * 3072 + 3072
    assert counts["vision_projector"] == 1152 * 3072 + 3072 + 3072 * 3072 + 3072 + 2 * 1152
    # SigLIP-so400m at 448 px, 26 of 27 layers kept (features of layer -2; post-norm and head pruned)
    from mmtune.multimodal.vision import VisionTower, build_vision_config

    with torch.device("meta"):
        full = VisionTower.from_config(build_vision_config("siglip"), feature_layer=-1, prune=False)
    vm = getattr(full.model, "vision_model", full.model)  # transformers 5 flattens SiglipVisionModel
    dropped = sum(p.numel() for m in (vm.encoder.layers[-1], vm.post_layernorm, vm.head) for p in m.parameters())
    assert counts["vision_encoder"] == sum(p.numel() for p in full.parameters()) - dropped
    # the whole model, with the unpruned tower, against the published ~5.57B
    total = counts["total"] + dropped
    assert abs(total - 5.57e9) / 5.57e9 < 0.005, total
