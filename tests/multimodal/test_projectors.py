"""Projectors: parity with transformers' InternVL and Phi-4-multimodal image embeddings (weights
copied, same features in), and output lengths equal to the tilers' token counts."""

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from mmtune.errors import ConfigError
from mmtune.multimodal.pixel_shuffle import pixel_shuffle
from mmtune.multimodal.projectors import PROJECTORS
from mmtune.multimodal.tiling import internvl_tiles, phi4_crops


def test_registry_and_flat_builders():
    assert PROJECTORS.names() == ["internvl_pixel_shuffle", "mlp2x_gelu", "phi4_avgpool"]
    p = PROJECTORS.get("mlp2x_gelu")(in_dim=8, out_dim=16)
    x = torch.randn(3, 4, 4, 8)
    y = p(x)
    assert y.shape == (48, 16) == (p.num_tokens(3, 4, 4), 16)
    ref = p.mlp[2](torch.nn.functional.gelu(p.mlp[0](x.reshape(-1, 8))))
    assert torch.allclose(y, ref)
    with pytest.raises(ConfigError, match="in_dim"):
        p(torch.randn(1, 4, 4, 7))
    with pytest.raises(ConfigError, match="Did you mean"):
        PROJECTORS.get("mlp2x_gelu_")


def test_internvl_projector_matches_transformers():
    from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

    torch.manual_seed(0)
    cfg = SimpleNamespace(vision_config=SimpleNamespace(hidden_size=8), text_config=SimpleNamespace(hidden_size=24),
                          downsample_ratio=0.5, projector_hidden_act="gelu")
    hf = InternVLMultiModalProjector(cfg)
    ours = PROJECTORS.get("internvl_pixel_shuffle")(in_dim=8, out_dim=24)
    ours.mlp.load_state_dict({"0.weight": hf.layer_norm.weight, "0.bias": hf.layer_norm.bias,
                              "1.weight": hf.linear_1.weight, "1.bias": hf.linear_1.bias,
                              "3.weight": hf.linear_2.weight, "3.bias": hf.linear_2.bias})
    feats = torch.randn(3, 8, 8, 8)
    ref = hf(InternVLModel.pixel_shuffle(None, feats, 0.5).reshape(3, -1, 32)).reshape(-1, 24)
    assert torch.allclose(ours(feats), ref, atol=1e-6)


def test_internvl_projector_length_equals_tiler_count():
    p = PROJECTORS.get("internvl_pixel_shuffle")(in_dim=4, out_dim=6)
    t = internvl_tiles(Image.new("RGB", (1000, 500)))
    feats = torch.randn(t.num_tiles, 32, 32, 4)  # 448/14 patch grid per tile
    assert p(feats).shape == (t.num_tokens, 6) and t.num_tokens == 3 * 256
    assert p.num_tokens(t.num_tiles, 32, 32) == t.num_tokens


def hf_patch_mask(width, height, crop, patch, max_num):
    """Per-crop patch attention mask (global view first), as Phi4MultimodalImageProcessor builds it."""
    w_num, h_num = math.ceil(width / crop), math.ceil(height / crop)
    assert w_num * h_num <= max_num
    tw, th = crop * w_num, crop * h_num
    rw, rh = tw / width, th / height
    pad_w, pad_h = (0, th - int(height * rw)) if rw < rh else (tw - int(width * rh), 0)
    ms = crop // patch
    mask = torch.ones(ms * h_num, ms * w_num)
    if pad_w >= patch:
        mask[:, -math.floor(pad_w / patch):] = 0
    if pad_h >= patch:
        mask[-math.floor(pad_h / patch):, :] = 0
    crops = mask.reshape(h_num, ms, w_num, ms).transpose(1, 2).reshape(-1, ms, ms)
    return torch.cat([torch.ones(1, ms, ms), crops]), (th, tw)


@pytest.mark.parametrize("crop,size", [(56, (150, 60)), (56, (112, 112)), (56, (60, 170)), (56, (56, 56)),
                                       (42, (100, 50)), (42, (30, 90))])  # 42/14: odd patch grid
def test_phi4_projector_matches_transformers_image_embedding(crop, size):
    """Same features and weights into Phi4MultimodalImageEmbedding (its 2x2 pooling, HD layout,
    padding removal, newline/separator and projection) and into ours: equal outputs, and our
    count fills exactly the placeholder positions the HF model writes."""
    from transformers import Phi4MultimodalConfig
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalImageEmbedding

    patch, c, hidden = 14, 8, 16
    torch.manual_seed(0)
    cfg = Phi4MultimodalConfig(
        hidden_size=hidden, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        vision_config=dict(hidden_size=c, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=crop, patch_size=patch, crop_size=crop, image_token_id=99),
        audio_config=dict(hidden_size=16, intermediate_size=16, num_blocks=1, num_attention_heads=2))
    hf = Phi4MultimodalImageEmbedding(cfg).eval()
    with torch.no_grad():
        hf.sub_img_feature_extensor.normal_()
        hf.global_img_feature_extensor.normal_()

    tiled = phi4_crops(Image.new("RGB", size, (90, 30, 200)), crop_size=crop, patch_size=patch)
    m = crop // patch
    feats = torch.randn(tiled.num_tiles, m, m, c)  # ours: sub-crops row-major, global last

    ours = PROJECTORS.get("phi4_avgpool")(in_dim=c, out_dim=hidden)
    ours.mlp.load_state_dict({"0.weight": hf.img_projection_up.weight, "0.bias": hf.img_projection_up.bias,
                              "2.weight": hf.img_projection_down.weight, "2.bias": hf.img_projection_down.bias})
    with torch.no_grad():
        ours.newline.copy_(hf.sub_img_feature_extensor.view(-1))
        ours.separator.copy_(hf.global_img_feature_extensor.view(-1))
    out = ours(feats, tiled.grid, tiled.sub_token_grid)

    mask, (th, tw) = hf_patch_mask(*size, crop, patch, 36)
    hf_order = torch.cat([feats[-1:], feats[:-1]]).reshape(tiled.num_tiles, m * m, c)  # HF: global first
    hf.img_processor.forward = lambda *a, **k: SimpleNamespace(hidden_states=(hf_order, None))  # index -2
    n_tok = tiled.num_tokens
    with torch.no_grad():
        ref = hf(input_ids=torch.full((1, n_tok), 99), inputs_embeds=torch.zeros(1, n_tok, hidden),
                 image_pixel_values=torch.zeros(1, tiled.num_tiles, 3, crop, crop),
                 image_sizes=torch.tensor([[th, tw]]), image_attention_mask=mask.unsqueeze(0))[0]
    assert out.shape == (n_tok, hidden) == (ours.num_tokens(tiled.num_tiles, m, m, tiled.grid, tiled.sub_token_grid),
                                            hidden)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("size,tokens", [((448, 448), 545), ((1344, 896), 1841), ((500, 300), 721)])
def test_phi4_projector_length_equals_tiler_count_full_geometry(size, tokens):
    t = phi4_crops(Image.new("RGB", size))
    p = PROJECTORS.get("phi4_avgpool")(in_dim=4, out_dim=6)
    feats = torch.randn(t.num_tiles, 32, 32, 4)  # 448/14 patches per crop
    out = p(feats, t.grid, t.sub_token_grid)
    assert out.shape == (t.num_tokens, 6) and t.num_tokens == tokens


def test_phi4_projector_layout_and_gradients():
    p = PROJECTORS.get("phi4_avgpool")(in_dim=3, out_dim=5)
    with torch.no_grad():
        p.newline.fill_(7.0)
        p.separator.fill_(-7.0)
    p.mlp = torch.nn.Identity()  # look at the assembled sequence itself
    feats = torch.arange(3 * 2 * 2 * 3, dtype=torch.float32).reshape(3, 2, 2, 3)  # 1x2 grid + global, 1 token each
    seq = p(feats, grid=(1, 2))
    # [crop0, crop1, newline, separator, global, newline]
    expect = torch.stack([feats[0].mean((0, 1)), feats[1].mean((0, 1)), torch.full((3,), 7.0),
                          torch.full((3,), -7.0), feats[2].mean((0, 1)), torch.full((3,), 7.0)])
    assert torch.equal(seq, expect)

    q = PROJECTORS.get("phi4_avgpool")(in_dim=3, out_dim=5)
    q(torch.randn(3, 2, 2, 3), grid=(1, 2)).square().sum().backward()
    assert q.newline.grad.abs().sum() > 0 and q.separator.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="1 global view"):
        q(torch.randn(2, 2, 2, 3), grid=(1, 2))


def test_phi4_projector_parameter_count_on_meta():
    # Phi-4-multimodal image projection: Linear(1152,3072)-GELU-Linear(3072,3072) + 2 extensor vectors.
    with torch.device("meta"):
        p = PROJECTORS.get("phi4_avgpool")(in_dim=1152, out_dim=3072)
    n = sum(t.numel() for t in p.parameters())
    assert n == (1152 * 3072 + 3072) + (3072 * 3072 + 3072) + 2 * 1152 == 12_984_576
    with torch.device("meta"):
        q = PROJECTORS.get("internvl_pixel_shuffle")(in_dim=1024, out_dim=4096)  # InternViT-300M -> 7B LM
    assert sum(t.numel() for t in q.parameters()) == 2 * 4096 + (4096 * 4096 + 4096) + (4096 * 4096 + 4096)


def test_pixel_shuffle_tokens_keep_neighbourhoods():
    # internvl projector sees each 2x2 neighbourhood stacked: check via the shuffle it applies
    feats = torch.randn(1, 4, 4, 2)
    shuffled = pixel_shuffle(feats)
    assert torch.equal(shuffled[0, 1, 0], torch.cat([feats[0, 2, 0], feats[0, 2, 1], feats[0, 3, 0], feats[0, 3, 1]]))
