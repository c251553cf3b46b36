"""A third modality added from this file alone: a ``depth`` path (a depth map, patchified by a tiny
convolution, LLaVA's MLP projector) registered in MODALITIES, configured by a ``depth`` section on
a subclass of the recipe's MultimodalConfig, and composed next to the built-in image and audio
paths. Nothing under src/ knows about it; the test checks that its groups, placeholder token,
early fusion, routing, save/load and parameter counts all come out of the generic code
(docs/extending.md)."""

from dataclasses import dataclass

import pytest
import torch
from pydantic import Field
from torch import nn

from mmtune.config import ModelConfig
from mmtune.errors import MMTuneError
from mmtune.models.loading import load_model, load_tokenizer, resolve_model_path
from mmtune.multimodal.config import MultimodalConfig
from mmtune.multimodal.modalities import MODALITIES, ModalityPath
from mmtune.multimodal.model import (
    build_audio_encoder,
    build_vision_tower,
    compose,
    load_composed,
    parameter_counts,
)
from mmtune.multimodal.projectors import build_projector
from mmtune.multimodal.synthetic_audio import procedural_speech
from mmtune.multimodal.synthetic_images import make_shapes_dataset
from mmtune.schema import Section


@dataclass
class DepthInput:
    depth: torch.Tensor  # (S, S) float
    num_tokens: int


class DepthEncoder(nn.Module):
    """``(B, 1, S, S) -> (B, S/p, S/p, C)``: one strided convolution."""

    def __init__(self, patch: int = 8, hidden: int = 16):
        super().__init__()
        self.patch, self.hidden_size = patch, hidden
        self.conv = nn.Conv2d(1, hidden, patch, stride=patch)

    def forward(self, x):
        return self.conv(x).permute(0, 2, 3, 1)  # (B, C, h, w) -> (B, h, w, C)


class DepthConfig(Section):
    size: int = Field(32, description="Side the depth map is resized to.")
    patch: int = Field(8, description="Patch side.")


class DepthMultimodalConfig(MultimodalConfig):
    """The recipe's config entry: one section and its placeholder token."""

    depth: DepthConfig | None = None
    depth_token: str = "<|depth|>"


@MODALITIES.register("depth")
class DepthPath(ModalityPath):
    name = "depth"
    tag = "<depth>"
    default_token = "<|depth|>"
    config_key = "depth"
    COMPONENTS = {"depth_encoder": "encoder", "depth_projector": "projector"}

    def __init__(self, encoder, projector, size, token=None):
        super().__init__(None, token)
        self.encoder, self.projector, self.size = encoder, projector, size

    def processor_dict(self):
        return {"size": self.size}

    def process(self, depth) -> DepthInput:
        d = torch.nn.functional.interpolate(torch.as_tensor(depth, dtype=torch.float32)[None, None],
                                            size=(self.size, self.size), mode="bilinear")[0, 0]  # (S, S)
        return DepthInput(d, (self.size // self.encoder.patch) ** 2)

    def encode(self, items, route=None):
        x = torch.stack([it.depth for it in items])[:, None]  # (B, 1, S, S)
        feats = self.encoder(x.to(self.encoder.conv.weight.dtype))  # (B, h, w, C)
        return torch.cat([self.projector(f[None]) for f in feats])  # (B*h*w, H)

    def describe_component(self, component, module):
        if component == "depth_encoder":
            return {"kind": "depth_conv", "patch": module.patch, "hidden": module.hidden_size}
        return super().describe_component(component, module)

    @classmethod
    def load_component(cls, directory, component, desc):
        if desc["kind"] == "depth_conv":
            return DepthEncoder(desc["patch"], desc["hidden"])
        return super().load_component(directory, component, desc)

    @classmethod
    def from_saved(cls, modules, processor, token):
        return cls(modules["depth_encoder"], modules["depth_projector"], processor["size"], token)

    @classmethod
    def build_encoder(cls, section, cache_root=None):
        return DepthEncoder(section.patch)

    @classmethod
    def build(cls, section, mm_cfg, encoder, hidden, dtype, token=None):
        return cls(encoder, build_projector("mlp2x_gelu", encoder.hidden_size, hidden).to(dtype), section.size,
                   token)


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    cfg = DepthMultimodalConfig.model_validate({
        "vision": {"max_crops": 4}, "audio": {}, "depth": {},
        "adapters": [{"name": "vision", "r": 4}, {"name": "speech", "r": 4}],
        "stages": [{"name": "s", "sources": [], "trainable": {"llm": "lora"}, "adapter": "vision"}]})
    model_cfg = ModelConfig(path="builtin:tiny", dtype="float32")
    tokenizer = load_tokenizer(resolve_model_path(model_cfg.path))
    lm = load_model(model_cfg, None, training=True)
    cache = tmp_path_factory.mktemp("cache")
    encoders = {"image": build_vision_tower(cfg.vision, cache), "audio": build_audio_encoder(cfg.audio),
                "depth": DepthPath.build_encoder(cfg.depth)}
    torch.manual_seed(0)
    model = compose(lm, tokenizer, cfg, encoders=encoders).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    return model


def test_a_third_modality_is_one_registered_path_and_a_config_entry(composed, tmp_path):
    model = composed
    assert list(model.modalities) == ["image", "audio", "depth"]
    assert model.modalities["depth"].encoder is model.depth_encoder  # a view: registered once, by component
    assert model.groups == ("text", "image", "audio", "depth", "image+audio", "image+depth", "audio+depth",
                            "image+audio+depth")
    assert {g: model.router.table[g] for g in ("depth", "image+depth", "audio+depth")} == \
        {"depth": None, "image+depth": "vision", "audio+depth": "speech"}
    counts = parameter_counts(model)
    assert counts["depth_encoder"] == 1 * 16 * 8 * 8 + 16
    assert any(n.startswith("depth_projector.") for n, _ in model.named_parameters())

    tok = model.modalities["depth"].token_id
    assert tok is not None and tok not in (model.image_token_id, model.audio_token_id)
    depth = model.process("depth", torch.rand(48, 40))
    image = model.process_image(make_shapes_dataset(1, seed=1, size=64)[0]["image"])
    clip = model.process_audio(procedural_speech("two", voice="tone-1"))
    ids = torch.tensor([[1, 7] + [model.image_token_id] * image.num_tokens + [tok] * depth.num_tokens
                        + [model.audio_token_id] * clip.num_tokens + [9, 10]])
    media = {"image": [image], "audio": [clip], "depth": [depth]}
    with torch.no_grad():
        out = model(ids, media=media)
        assert out.route.group == "image+audio+depth" and out.route.adapter == "vision"
        embeds = model.embed(ids, route=out.route, media=media)[0]  # (T, H)
        torch.testing.assert_close(embeds[ids[0] == tok], model.modalities["depth"].encode([depth]))
        # the depth features reach the logits: another depth map changes them
        other = model(ids, media={**media, "depth": [model.process("depth", torch.rand(48, 40))]})
        assert (other.logits - out.logits).abs().max() > 1e-4
    no_depth = torch.tensor([[t for t in ids[0].tolist() if t != tok]])
    with pytest.raises(MMTuneError, match="the batch has 0 depth placeholder tokens but its 1 depth"):
        model(no_depth, media=media)

    model.save(tmp_path / "m")
    loaded = load_composed(tmp_path / "m", device="cpu")
    assert list(loaded.modalities) == ["image", "audio", "depth"]
    assert [n for n, _ in loaded.named_parameters() if n.startswith("depth_")] == \
        [n for n, _ in model.named_parameters() if n.startswith("depth_")]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, media=media).logits, out.logits)
    # assigning a component keeps the view in step (one module, two names)
    old, new = model.depth_projector, build_projector("mlp2x_gelu", 16, model.hidden_size)
    model.depth_projector = new
    assert model.modalities["depth"].projector is new and dict(model.named_children())["depth_projector"] is new
    model.depth_projector = old
