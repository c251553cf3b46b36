"""Token reduction on encoder patch grids: InternVL's pixel shuffle and Phi-4's 2x2 average pool.

Both turn a ``(N, h, w, C)`` grid of patch features into a grid with a quarter of the tokens.
Pixel shuffle keeps every feature (stacks each 2x2 neighbourhood into the channel axis, 4C);
average pooling keeps the width (C) and averages the neighbourhood.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    """InternVL pixel shuffle (``ps_version='v2'``): ``(N, h, w, C) -> (N, h*s, w*s, C/s^2)``.

    With ``k = 1/scale`` (2 for the published 0.5) the mapping is::

        y[n, i, j, (k*a + b)*C + c] = x[n, k*i + a, k*j + b, c]     0 <= a, b < k

    i.e. each output token holds its ``k x k`` neighbourhood row by row, channels innermost.
    That is ``y[i,j,(2a+b)*C+c] = x[2i+a, 2j+b, c]`` (docs/reference/multimodal.md#pixel-shuffle), and it is index-identical
    to the op sequence of ``InternVLChatModel.pixel_shuffle`` (OpenGVLab/InternVL,
    modeling_internvl_chat.py; also ``InternVLModel.pixel_shuffle`` in transformers):
    ``view(n, w, h*s, c/s) -> permute(0,2,1,3) -> view(n, h*s, w*s, c/s^2) -> permute(0,2,1,3)``,
    which the tests check element by element. Their code names the axes ``(n, w, h, c)`` but
    applies it to ``(N, rows, cols, C)`` grids; the mapping above holds for either reading and
    for non-square grids. ``ps_version='v1'`` (InternVL 1.x) omits the last permute and returns
    the transposed grid; it is not reproduced here.
    """
    k = round(1 / scale)
    if k < 1 or abs(k * scale - 1) > 1e-9:
        raise ConfigError(f"pixel shuffle scale must be 1/k for an integer k (0.5, 0.25, ...), got {scale}")
    n, h, w, c = x.shape
    if h % k or w % k:
        raise ConfigError(f"pixel shuffle by {scale} needs a patch grid divisible by {k}, got {h}x{w}; "
                          f"choose image_size / patch_size even")
    x = x.reshape(n, h // k, k, w // k, k, c)  # (N, h/k, a, w/k, b, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, h/k, w/k, a, b, C)
    return x.reshape(n, h // k, w // k, k * k * c)  # (N, h/k, w/k, k*k*C), channel = (k*a + b)*C + c


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """Phi-4's token compression: ``(N, h, w, C) -> (N, ceil(h/2), ceil(w/2), C)``, 2x2 mean.

    An odd side is first padded by one reflected row/column, as Phi4MultimodalImageEmbedding
    does (``ReflectionPad2d((0, 1, 0, 1))`` when the patch grid is odd), so that the last row of
    tokens exists and matches the processor's ``mask[0::2]`` count. A side of one patch cannot
    be reflected and is replicated instead.
    """
    n, h, w, c = x.shape
    y = x.permute(0, 3, 1, 2)  # (N, C, h, w)
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        mode = "reflect" if min(h, w) > 1 else "replicate"
        y = F.pad(y, (0, pad_w, 0, pad_h), mode=mode)  # (N, C, h+pad_h, w+pad_w)
    y = F.avg_pool2d(y, kernel_size=2, stride=2)  # (N, C, ceil(h/2), ceil(w/2))
    return y.permute(0, 2, 3, 1)  # (N, ceil(h/2), ceil(w/2), C)
