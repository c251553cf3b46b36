"""Tiling: published token counts (docs/reference/multimodal.md#phi-4-dynamic-crops and #internvl-tiling), grid choice against straightforward
re-implementations of the published algorithms, tile order and padding."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmtune.errors import ConfigError, DataError
from mmtune.multimodal.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TILERS,
    frame_indices,
    internvl_tiles,
    phi4_crops,
    phi4_num_tokens,
    phi4_token_side,
    sample_frames,
    video_tiles,
)


def ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    """InternVL / Phi-4 ``find_closest_aspect_ratio``, as published."""
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_target_ratios(min_num, max_num):
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num)
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def ref_phi4_tokens(width, height, image_size=448, patch_size=14, max_num=36):
    """Phi4MultimodalImageProcessor: dynamic_preprocess (grid, resize, padding mask) and the
    num_img_tokens expression of _preprocess, at the released 448/14 geometry."""
    w_crop_num, h_crop_num = math.ceil(width / image_size), math.ceil(height / image_size)
    if w_crop_num * h_crop_num > max_num:
        target = ref_find_closest_aspect_ratio(width / height, ref_target_ratios(1, max_num), width, height, image_size)
    else:
        target = (w_crop_num, h_crop_num)
    target_width, target_height = image_size * target[0], image_size * target[1]
    ratio_width, ratio_height = target_width / width, target_height / height
    if ratio_width < ratio_height:
        padding_width, padding_height = 0, target_height - int(height * ratio_width)
    else:
        padding_width, padding_height = target_width - int(width * ratio_height), 0
    mask_size = image_size // patch_size
    attention_mask = torch.ones((mask_size * target[1], mask_size * target[0]))
    if padding_width >= patch_size:
        attention_mask[:, -math.floor(padding_width / patch_size):] = 0
    if padding_height >= patch_size:
        attention_mask[-math.floor(padding_height / patch_size):, :] = 0
    mh, mw = attention_mask.shape
    m = attention_mask.reshape(mh // mask_size, mask_size, mw // mask_size, mask_size).transpose(1, 2)
    m = m.reshape(-1, mask_size, mask_size)[:, 0::2, 0::2]
    half = mask_size // 2 + mask_size % 2
    m = m.reshape(mh // mask_size, mw // mask_size, half, half).transpose(1, 2)
    m = m.reshape(m.size(0) * m.size(1), m.size(2) * m.size(3))
    tokens = 256 + 1 + int(m.sum().item()) + int(m[:, 0].sum().item()) + 16
    return tokens, (target[1], target[0])


def ref_phi4_pixel_values(image, image_size=448, patch_size=14, max_num=36):
    """Phi4MultimodalImageProcessor's pixels, with the torch ops its torchvision calls run:
    ``dynamic_preprocess`` (``tvF.resize`` of the uint8 image: bilinear, antialias; white pad),
    ``rescale_and_normalize`` (0.5/0.5), the global view ``self.resize(processed, 448, BICUBIC,
    antialias=False)`` of the normalised canvas, and the crops in row-major order.
    Returns ``(global (3, C, C), crops (N, 3, C, C))``."""
    x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)
    height, width = x.shape[-2:]
    _, (rows, cols) = ref_phi4_tokens(width, height, image_size, patch_size, max_num)
    target_width, target_height = image_size * cols, image_size * rows
    ratio_width, ratio_height = target_width / width, target_height / height
    if ratio_width < ratio_height:
        new_w, new_h = target_width, int(height * ratio_width)
    else:
        new_w, new_h = int(width * ratio_height), target_height
    img = torch.nn.functional.interpolate(x[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                                          antialias=True)[0]
    img = torch.nn.functional.pad(img, (0, target_width - new_w, 0, target_height - new_h), value=255)
    processed = (img.float() / 255.0 - 0.5) / 0.5  # (3, th, tw)
    glob = torch.nn.functional.interpolate(processed[None], size=(image_size, image_size), mode="bicubic",
                                           align_corners=False, antialias=False)[0]
    crops = processed.reshape(1, 3, rows, image_size, cols, image_size).permute(0, 2, 4, 1, 3, 5)  # (1, r, c, 3, C, C)
    return glob, crops.reshape(-1, 3, image_size, image_size)


def shapes_image(w, h, seed):
    """Flat regions with sharp edges (where antialiasing matters most) on a grey background."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), (int(rng.integers(256)),) * 3)
    draw = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = int(rng.integers(w)), int(rng.integers(h))
        draw.ellipse([x0, y0, x0 + int(rng.integers(20, max(21, w // 2))), y0 + int(rng.integers(20, max(21, h // 2)))],
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return im


def solid(w, h, rgb=(120, 60, 200)):
    return Image.new("RGB", (w, h), rgb)


# --------------------------------------------------------------------------------- Phi-4


def test_phi4_published_counts_full_geometry():
    t = phi4_crops(solid(448, 448))
    assert (t.grid, t.num_tokens, t.num_tiles) == ((1, 1), 545, 2)
    t = phi4_crops(solid(1344, 896))
    assert (t.grid, t.num_tokens, t.num_tiles) == ((2, 3), 1841, 7)  # 2 rows x 3 cols + global
    for h, w in [(1, 1), (2, 3), (4, 4), (3, 12)]:  # the published formula without padding
        assert phi4_num_tokens(h, w, side=16) == (h * w + 1) * 256 + 1 + (h + 1) * 16
    assert all(tile.size == (448, 448) for tile in t.tiles)


def test_phi4_closest_aspect_ratio_branch():
    # 6000x1500: ceil grid 14x4 = 56 crops > 36 -> closest aspect ratio 4:1; (4,1), (8,2) and
    # (12,3) tie at 0 and the image is big enough that the largest, 12 cols x 3 rows, wins.
    t = phi4_crops(solid(6000, 1500))
    assert t.grid == (3, 12)
    assert ref_find_closest_aspect_ratio(4.0, ref_target_ratios(1, 36), 6000, 1500, 448) == (12, 3)
    assert t.num_tokens == (36 + 1) * 256 + 1 + (3 + 1) * 16 == 9537
    assert t.num_tiles == 37
    # max_crops=4 on 1000x1000: 3x3 ceil grid too many; (1,1) and (2,2) tie, area wins -> 2x2.
    t = phi4_crops(solid(1000, 1000), max_crops=4)
    assert t.grid == (2, 2) and t.num_tokens == 5 * 256 + 1 + 3 * 16
    # 3000x1000 with max_crops 6: ratio 3 -> (3,1) then (6,2)? area 12 > 6 excluded -> 1 row x 3 cols.
    t = phi4_crops(solid(3000, 1000), max_crops=6)
    assert t.grid == (1, 3)


@pytest.mark.parametrize("size", [(448, 448), (1344, 896), (500, 300), (300, 500), (1000, 450), (449, 449),
                                  (640, 480), (1280, 720), (100, 900), (2000, 600), (6000, 1500), (37, 51)])
def test_phi4_counts_match_processor_reference(size):
    tokens, grid = ref_phi4_tokens(*size)
    t = phi4_crops(solid(*size))
    assert (t.num_tokens, t.grid) == (tokens, grid)


def test_phi4_padding_drops_token_rows_and_cols():
    # 500x300 -> 2 cols x 1 row; resized to 746x448, 150 px white on the right: 10 patch cols
    # masked of 64, so 27 of 32 token cols remain: 16*(27+1) + 1 + 16*17 = 721 (not 801).
    t = phi4_crops(solid(500, 300, (10, 200, 10)))
    assert t.grid == (1, 2) and t.sub_token_grid == (16, 27) and t.num_tokens == 721
    right = np.asarray(t.tiles[1])
    assert (right[:, 298:] == 255).all()  # padding is white
    assert (right[:, :297] == (10, 200, 10)).all()  # content up to the resized width (746 - 448)


def test_phi4_tiles_are_row_major_then_global():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    img = Image.new("RGB", (3 * 448, 2 * 448))
    for k, c in enumerate(colours):  # k = row*3 + col
        img.paste(c, ((k % 3) * 448, (k // 3) * 448, (k % 3 + 1) * 448, (k // 3 + 1) * 448))
    t = phi4_crops(img)
    assert t.grid == (2, 3)
    for k, c in enumerate(colours):
        assert tuple(np.asarray(t.tiles[k])[200, 200]) == c
    glob = np.asarray(t.tiles[-1])  # downscaled whole image: top-left red, bottom-right magenta
    assert tuple(glob[40, 40]) == colours[0] and tuple(glob[-40, -40]) == colours[5]


def test_phi4_tiny_geometry_uses_same_formula():
    assert phi4_token_side(448, 14) == 16
    assert phi4_token_side(28, 14) == 1  # 2x2 patches -> 1 token
    assert phi4_token_side(42, 14) == 2  # 3x3 patches, padded to 4x4 -> 2x2 tokens
    t = phi4_crops(solid(56, 28), crop_size=28, patch_size=14)
    assert t.grid == (1, 2) and t.num_tokens == (2 + 1) * 1 + 1 + (1 + 1) * 1
    t = phi4_crops(solid(84, 84), crop_size=42, patch_size=14)
    assert t.grid == (2, 2) and t.num_tokens == (4 + 1) * 4 + 1 + 3 * 2


def test_phi4_pixel_values_normalised():
    t = phi4_crops(solid(448, 448, (255, 0, 128)))
    x = t.pixel_values()
    assert x.shape == (2, 3, 448, 448) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 10, 10], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)


def test_phi4_extreme_aspect_ratio_is_a_data_error():
    with pytest.raises(DataError, match="extreme aspect ratio"):
        phi4_crops(solid(5000, 5))


# --------------------------------------------------------------------------------- InternVL


@pytest.mark.parametrize("size,max_num", [((448, 448), 12), ((1000, 500), 12), ((500, 1000), 12), ((1920, 1080), 12),
                                          ((1000, 800), 6), ((500, 400), 6), ((4000, 1000), 12), ((300, 2000), 6),
                                          ((800, 600), 12), ((1000, 1000), 12), ((30, 20), 12)])
def test_internvl_grid_matches_published_algorithm(size, max_num):
    w, h = size
    cols, rows = ref_find_closest_aspect_ratio(w / h, ref_target_ratios(1, max_num), w, h, 448)
    t = internvl_tiles(solid(w, h), max_num=max_num)
    assert t.grid == (rows, cols)
    n = rows * cols + (1 if rows * cols > 1 else 0)
    assert t.num_tiles == n and t.num_tokens == 256 * n
    assert all(tile.size == (448, 448) for tile in t.tiles)


def test_internvl_tie_rule_prefers_larger_grid_for_large_images():
    # aspect 1.25 is equally far from 1:1 and 3:2 (max_num 6): large image -> (3,2), small -> (1,1)
    assert internvl_tiles(solid(1000, 800), max_num=6).grid == (2, 3)
    assert internvl_tiles(solid(500, 400), max_num=6).grid == (1, 1)


def test_internvl_thumbnail_and_stretch():
    one = internvl_tiles(solid(448, 448))
    assert one.num_tiles == 1 and not one.has_global and one.num_tokens == 256
    img = Image.new("RGB", (900, 450), (255, 0, 0))
    img.paste((0, 0, 255), (450, 0, 900, 450))
    t = internvl_tiles(img)
    assert t.grid == (1, 2) and t.has_global and t.num_tokens == 3 * 256
    assert tuple(np.asarray(t.tiles[0])[224, 100]) == (255, 0, 0)
    assert tuple(np.asarray(t.tiles[1])[224, 300]) == (0, 0, 255)
    thumb = np.asarray(t.tiles[2])  # whole image squeezed into 448x448
    assert tuple(thumb[224, 50]) == (255, 0, 0) and tuple(thumb[224, 400]) == (0, 0, 255)
    assert not internvl_tiles(img, use_thumbnail=False).has_global


def test_internvl_imagenet_normalisation():
    x = internvl_tiles(solid(448, 448, (255, 128, 0))).pixel_values()
    want = (torch.tensor([1.0, 128 / 255, 0.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(x[0, :, 0, 0], want, atol=1e-6)


def test_internvl_min_num_and_bad_sizes():
    # at least 2 tiles: a square image can no longer be 1x1, the closest square grid is 2x2
    assert internvl_tiles(solid(448, 448), min_num=2, max_num=4).grid == (2, 2)
    assert internvl_tiles(solid(448, 448), min_num=2, max_num=3).num_tiles == 3  # 1x2 or 2x1 + thumbnail
    with pytest.raises(ConfigError, match="min_num"):
        internvl_tiles(solid(10, 10), min_num=3, max_num=2)
    with pytest.raises(ConfigError, match="not divisible"):
        internvl_tiles(solid(10, 10), image_size=42, patch_size=14)


def test_tilers_registry():
    assert TILERS.names() == ["internvl", "phi4"]
    assert TILERS.get("phi4") is phi4_crops and TILERS.get("internvl") is internvl_tiles
    with pytest.raises(ConfigError, match="did you mean 'phi4'|Did you mean 'phi4'"):
        TILERS.get("phi3")


# --------------------------------------------------------------------------------- video


def test_sample_frames_uniform():
    idx = frame_indices(100, 8)
    assert idx == sorted(set(idx)) and len(idx) == 8
    gaps = np.diff(idx)
    assert gaps.max() - gaps.min() <= 1 and idx[0] == 6 and idx[-1] == 93  # midpoints of 12.5-frame segments
    assert frame_indices(5, 5) == [0, 1, 2, 3, 4]
    assert len(frame_indices(3, 7)) == 7  # repeats keep the count fixed
    assert sample_frames(list("abcdefghij"), 2) == ["c", "h"]


def test_video_tiles_one_tile_per_frame():
    frames = [solid(640, 360, (i * 20, 0, 0)) for i in range(10)]
    tiled = video_tiles(frames, num_frames=4)
    assert len(tiled) == 4
    assert all(t.num_tiles == 1 and t.num_tokens == 256 and not t.has_global for t in tiled)
    reds = [int(np.asarray(t.tiles[0])[0, 0, 0]) for t in tiled]
    assert reds == [20 * i for i in frame_indices(10, 4)]


def _random_sizes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(1344, 1008)] + [(int(rng.integers(40, 1600)), int(rng.integers(40, 1600))) for _ in range(n - 1)]


@pytest.mark.parametrize("kind", ["shapes", "noise"])
def test_phi4_global_view_at_pixel_parity_with_the_processor(kind):
    """The global view is the normalised canvas resized bicubic without antialiasing (float, not
    8-bit), the crops the canvas resized bilinear with antialiasing: equal to the processor's.
    Before: PIL's antialiased bicubic, 0.81 max on a 1344x1008 shapes image, 1.44 on noise."""
    rng = np.random.default_rng(1)
    for k, (w, h) in enumerate(_random_sizes(8)):
        im = shapes_image(w, h, k) if kind == "shapes" else Image.fromarray(
            rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        t = phi4_crops(im)
        ours = t.pixel_values()
        glob, crops = ref_phi4_pixel_values(im)
        assert ours.shape == (crops.shape[0] + 1, 3, 448, 448)
        assert (ours[-1] - glob).abs().max() <= 4e-3  # measured 4.8e-7
        assert (ours[:-1] - crops).abs().max() <= 1e-6
    if kind == "noise":  # a 2x2 grid halves the canvas: bicubic taps at t=0.5 overshoot, kept unclipped
        glob = phi4_crops(Image.fromarray(rng.integers(0, 256, (800, 800, 3), dtype=np.uint8))).global_view
        assert glob.min() < 0 and glob.max() > 1


def test_phi4_pixels_match_transformers_image_processor():
    """Against transformers' Phi4MultimodalImageProcessor itself (it needs torchvision)."""
    pytest.importorskip("torchvision")
    from transformers.models.phi4_multimodal import Phi4MultimodalImageProcessor

    proc = Phi4MultimodalImageProcessor()
    for k, (w, h) in enumerate(_random_sizes(6, seed=2)):
        im = shapes_image(w, h, k)
        out = proc(im, return_tensors="pt")
        ref = out["image_pixel_values"][0]  # (1 + crops [+ padding crops], 3, C, C): global first
        ours = phi4_crops(im).pixel_values()
        n = ours.shape[0] - 1
        assert (ours[-1] - ref[0]).abs().max() <= 4e-3
        assert (ours[:-1] - ref[1:n + 1]).abs().max() <= 2 / 255 + 1e-6  # one 8-bit level (uint8 kernels)
