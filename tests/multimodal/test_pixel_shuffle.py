"""Pixel shuffle is index-identical to InternVL's op sequence; 2x2 pooling matches Phi-4's ops."""

import pytest
import torch
from torch import nn

from mmtune.errors import ConfigError
from mmtune.multimodal.pixel_shuffle import avg_pool_2x2, pixel_shuffle


def internvl_reference(x, scale_factor=0.5):
    """InternVLChatModel.pixel_shuffle (OpenGVLab/InternVL modeling_internvl_chat.py, ps_version v2)."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 6, 10, 2), (3, 32, 32, 4)])
def test_matches_internvl_op_sequence_elementwise(shape):
    x = torch.arange(torch.Size(shape).numel()).reshape(shape)
    y = pixel_shuffle(x)
    assert torch.equal(y, internvl_reference(x))
    n, h, w, c = shape
    assert y.shape == (n, h // 2, w // 2, 4 * c)
    for b in range(n):  # docs/reference/multimodal.md#pixel-shuffle: y[i,j,(2a+b)*C+c] = x[2i+a, 2j+b, c]
        for i in range(h // 2):
            for j in range(w // 2):
                for a in range(2):
                    for bb in range(2):
                        for cc in range(c):
                            assert y[b, i, j, (2 * a + bb) * c + cc] == x[b, 2 * i + a, 2 * j + bb, cc]


def test_matches_transformers_internvl():
    from transformers.models.internvl.modeling_internvl import InternVLModel

    x = torch.randn(2, 16, 12, 5)
    assert torch.equal(pixel_shuffle(x), InternVLModel.pixel_shuffle(None, x, 0.5))


def test_other_scale_matches_reference():
    x = torch.arange(2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
    assert torch.equal(pixel_shuffle(x, 0.25), internvl_reference(x, 0.25))
    assert pixel_shuffle(x, 0.25).shape == (2, 2, 2, 48)


def test_bad_grid_or_scale():
    with pytest.raises(ConfigError, match="divisible"):
        pixel_shuffle(torch.zeros(1, 5, 4, 2))
    with pytest.raises(ConfigError, match="scale"):
        pixel_shuffle(torch.zeros(1, 4, 4, 2), 0.3)


def test_avg_pool_matches_phi4_ops():
    # even grid: AvgPool2d(2, 2) on NCHW
    x = torch.randn(3, 8, 8, 6)
    ref = nn.AvgPool2d(2, 2)(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    assert torch.allclose(avg_pool_2x2(x), ref)
    # odd grid: ReflectionPad2d((0, 1, 0, 1)) then AvgPool2d, as Phi4MultimodalImageEmbedding
    x = torch.randn(2, 7, 7, 4)
    ref = nn.AvgPool2d(2, 2)(nn.ReflectionPad2d((0, 1, 0, 1))(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
    y = avg_pool_2x2(x)
    assert y.shape == (2, 4, 4, 4) and torch.allclose(y, ref)
    assert avg_pool_2x2(torch.ones(1, 1, 1, 3)).shape == (1, 1, 1, 3)
