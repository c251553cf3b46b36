"""Dynamic high-resolution tiling of images into encoder-sized tiles, in the two published modes.

An encoder sees a fixed square (448 px for SigLIP-so400m / InternViT). A larger or non-square
image is cut into a grid of such tiles plus one low-resolution view of the whole image, so the
language model sees both detail and layout. Both modes pick a grid of ``cols x rows`` tiles;
they differ in how the grid is chosen and how the image is fitted to it.

``phi4`` (Phi-4-multimodal, ``Phi4MultimodalImageProcessor.dynamic_preprocess`` in
transformers; docs/reference/multimodal.md#phi-4-dynamic-crops)
    The grid is ``(ceil(W/C), ceil(H/C))`` when that many tiles fit in ``max_crops``, else the
    grid of closest aspect ratio among all grids with at most ``max_crops`` tiles. The image is
    resized keeping its aspect ratio to fit the grid and padded white on the right/bottom. A
    global ``C x C`` view of the padded canvas follows the tiles. Token rows/columns that fall
    entirely inside the padding are dropped by the model, so the token count depends on the
    padding (see :func:`phi4_num_tokens`). Both resizes are the processor's own (torch
    ``interpolate``): the canvas bilinear with antialiasing on 8-bit pixels, the global view
    bicubic *without* antialiasing on the float canvas, kept in float (:attr:`TiledImage.global_view`).

``internvl`` (InternVL 1.5/2/2.5 ``dynamic_preprocess``; docs/reference/multimodal.md#internvl-tiling)
    The grid is the closest aspect ratio among grids with ``min_num..max_num`` tiles; the image
    is stretched (no padding) to the grid; a thumbnail of the whole image follows when there is
    more than one tile. Every tile gives ``(C/patch/2)^2`` tokens (256 at 448/14) after the
    2x2 pixel shuffle.

Tiles are returned as PIL images in row-major order, the global view / thumbnail last (the
order in which their tokens are laid out; Phi-4's own processor stores the global view first in
its pixel tensor but emits its tokens last). :meth:`TiledImage.pixel_values` gives the
normalised ``(N, 3, C, C)`` tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError, DataError
from ..registry import Registry

# Normalisation constants. Phi-4's SigLIP tower uses 0.5/0.5 (Phi4MultimodalImageProcessor
# image_mean/image_std); InternVL uses the ImageNet statistics (build_transform in its README).
PHI4_MEAN = (0.5, 0.5, 0.5)
PHI4_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Phi-4 refuses resized content thinner than this many pixels ("the aspect ratio is very
# extreme" in Phi4MultimodalImageProcessor.dynamic_preprocess).
MIN_RESIZED_SIDE = 10

TILERS: Registry = Registry("tiler")


@dataclass
class TiledImage:
    """One image cut into encoder tiles.

    ``tiles``: PIL images, ``crop_size`` square, the ``grid`` tiles in row-major order followed by
    the global view (phi4) or thumbnail (internvl) when ``has_global``.
    ``grid``: ``(rows, cols)`` of the sub-image tiles.
    ``num_tokens``: language-model positions the image occupies after its projector.
    ``sub_token_grid``: ``(rows, cols)`` of the sub-image token grid that carry image content
    (phi4 drops token rows/cols lying wholly in the white padding; internvl has no padding).
    ``mean``/``std``: the normalisation :meth:`pixel_values` applies by default.
    ``global_view``: phi4 only, the exact global view ``(3, C, C)`` float32 in pixel/255 units
    (bicubic overshoots [0, 1]; ``tiles[-1]`` is it rounded to 8 bits for display);
    :meth:`pixel_values` uses it in place of ``tiles[-1]``.
    ``patch_mask``: phi4 only, ``(N, C/patch, C/patch)`` bool, False on the patches wholly inside
    the white padding (the global view is all True): the vision tower's attention mask, as
    Phi4MultimodalImageProcessor's ``image_attention_mask``.
    """

    tiles: list[Image.Image]
    grid: tuple[int, int]
    num_tokens: int
    has_global: bool
    sub_token_grid: tuple[int, int]
    crop_size: int
    mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    global_view: torch.Tensor | None = None
    patch_mask: torch.Tensor | None = None

    @property
    def num_tiles(self) -> int:
        return len(self.tiles)

    def pixel_values(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> torch.Tensor:
        """The tiles as a float tensor ``(N, 3, C, C)``, scaled to [0, 1] and normalised."""
        mean, std = self.mean if mean is None else mean, self.std if std is None else std
        if self.global_view is None:
            return images_to_tensor(self.tiles, mean, std)
        glob = normalize(self.global_view[None], mean, std)  # (1, 3, C, C)
        return torch.cat([images_to_tensor(self.tiles[:-1], mean, std), glob])


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``(N, 3, H, W)`` values in pixel/255 units."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float() - m) / s


def images_to_tensor(images: Sequence[Image.Image], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Stack same-sized RGB images into ``(N, 3, H, W)`` float32: ``(pixel/255 - mean) / std``."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images]) / 255.0  # (N, H, W, 3)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    return normalize(x, mean, std)


# ---------------------------------------------------------------------------------------------
# Grid choice (shared by both modes)


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All ``(cols, rows)`` grids with ``min_num <= cols*rows <= max_num``, sorted by tile count.

    Built exactly as InternVL/Phi-4 build ``target_ratios`` (a set, then a stable sort by area)
    so that ties between equal-area grids resolve in the same order as the published code.
    """
    grids = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_aspect_grid(width: int, height: int, grids: Sequence[tuple[int, int]], tile_size: int) -> tuple[int, int]:
    """The ``(cols, rows)`` grid whose ``cols/rows`` is closest to ``width/height``.

    On a tie the later (larger) grid wins when the image has more than half the pixels of that
    grid (``W*H > 0.5*C*C*cols*rows``): a big image gets more tiles, a small one is not blown up.
    This is ``find_closest_aspect_ratio`` of InternVL and Phi-4, to the letter (ties compare
    floats with ``==`` as they do).
    """
    aspect = width / height
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def _check_image(image: Image.Image) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise DataError(None, None, f"expected a PIL image, got {type(image).__name__}", reason="bad_image")
    if image.width < 1 or image.height < 1:
        raise DataError(None, None, f"image has size {image.width}x{image.height}", reason="bad_image")
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------
# Phi-4-multimodal


def phi4_token_side(crop_size: int = 448, patch_size: int = 14) -> int:
    """Tokens per side of one crop: the ``m = C // patch`` patch grid after 2x2 average pooling.

    Odd patch grids are reflection-padded to even before pooling (Phi4MultimodalImageEmbedding
    ``img_processor_padding``), hence ``ceil(m / 2)``: 448/14 = 32 patches -> 16 tokens.
    """
    m = crop_size // patch_size
    if m < 1:
        raise ConfigError(f"crop_size {crop_size} is smaller than patch_size {patch_size}; "
                          f"set a crop size of at least one patch")
    return (m + 1) // 2


def _valid_pooled(n_tiles: int, m: int, zero_patches: int) -> int:
    """Token rows (or cols) of a tiled axis that see content after padding.

    The patch mask of the axis has ``n_tiles*m`` entries, the last ``zero_patches`` of them 0
    (padding). Pooling keeps every second patch of each tile (``mask[0::2]`` per tile in
    Phi-4's processor), and a token row is kept when its first patch is content.
    """
    valid = n_tiles * m - zero_patches
    return sum(1 for t in range(n_tiles) for i in range(0, m, 2) if t * m + i < valid)


def phi4_num_tokens(rows: int, cols: int, side: int = 16, valid_rows: int | None = None,
                    valid_cols: int | None = None) -> int:
    """Image token count of Phi-4's HD layout for a ``rows x cols`` grid of ``side x side`` crops.

    Derivation (Phi4MultimodalImageEmbedding.forward, order ``sub_glb``):

    - sub-images: the crops' pooled features are joined into one ``(rows*side) x (cols*side)``
      token grid; rows/cols lying wholly in the padding are dropped, leaving
      ``valid_rows x valid_cols``; a learned newline token ends every row:
      ``valid_rows * (valid_cols + 1)``;
    - one learned separator token: ``1``;
    - global view: ``side`` rows of ``side`` tokens, each followed by a newline: ``side*(side+1)``.

    Without padding this is ``(rows*cols + 1)*side^2 + 1 + (rows + 1)*side``, i.e. the published
    ``(h*w + 1)*256 + 1 + (h+1)*16`` at ``side = 448/14/2 = 16``: 448x448 -> 545, 3x2 -> 1841 (docs/reference/multimodal.md#phi-4-dynamic-crops).
    """
    vr = rows * side if valid_rows is None else valid_rows
    vc = cols * side if valid_cols is None else valid_cols
    return vr * (vc + 1) + 1 + side * (side + 1)


@TILERS.register("phi4")
def phi4_crops(image: Image.Image, crop_size: int = 448, max_crops: int = 36, patch_size: int = 14,
               mean: Sequence[float] = PHI4_MEAN, std: Sequence[float] = PHI4_STD) -> TiledImage:
    """Phi-4-multimodal dynamic multi-crop ("dynamic HD") of one image.

    ``max_crops`` 36 is the default of Phi-4's released processor (``dynamic_hd``); the paper uses
    16 in pretraining and 36 in SFT. Geometry, resizes and masks follow transformers'
    ``Phi4MultimodalImageProcessor``: ``dynamic_preprocess`` scales by the smaller of
    ``target/orig`` per side, truncates to int, resizes the 8-bit image bilinearly with
    antialiasing (torchvision ``resize``'s default, which is torch ``interpolate``) and pads it
    white on the right/bottom; ``_preprocess`` then resizes the whole normalised canvas to
    ``C x C`` with bicubic interpolation and ``antialias=False`` for the global view. Both are
    done here with the same torch ``interpolate`` calls (bicubic is linear with weights summing
    to 1, so it commutes with the per-channel normalisation), and the global view is kept in
    float: no antialiasing, so it aliases fine detail exactly as the reference model saw in
    training, and bicubic overshoot beyond [0, 255] is not clipped.
    """
    image = _check_image(image)
    side = phi4_token_side(crop_size, patch_size)
    width, height = image.size
    cols, rows = math.ceil(width / crop_size), math.ceil(height / crop_size)
    if cols * rows > max_crops:
        cols, rows = closest_aspect_grid(width, height, candidate_grids(1, max_crops), crop_size)
    target_w, target_h = crop_size * cols, crop_size * rows

    ratio_w, ratio_h = target_w / width, target_h / height
    if ratio_w < ratio_h:
        new_w, new_h = target_w, int(height * ratio_w)
    else:
        new_w, new_h = int(width * ratio_h), target_h
    if min(new_w, new_h) < MIN_RESIZED_SIDE:
        raise DataError(None, None, f"image {width}x{height} has an extreme aspect ratio: it would be resized "
                        f"to {new_w}x{new_h} px on a {cols}x{rows} grid of {crop_size} px crops; crop or pad "
                        f"the image, or raise max_crops", reason="extreme_aspect_ratio")
    pad_w, pad_h = target_w - new_w, target_h - new_h

    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    resized = torch.nn.functional.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False,
                                              antialias=True)  # (1, 3, new_h, new_w) uint8
    canvas = torch.full((1, 3, target_h, target_w), 255, dtype=torch.uint8)  # white padding right/bottom
    canvas[:, :, :new_h, :new_w] = resized
    global_view = torch.nn.functional.interpolate(canvas.float() / 255.0, size=(crop_size, crop_size), mode="bicubic",
                                                  align_corners=False, antialias=False)[0]  # (3, C, C)
    canvas_image = Image.fromarray(canvas[0].permute(1, 2, 0).numpy())  # (target_h, target_w, 3)
    tiles = [canvas_image.crop((c * crop_size, r * crop_size, (c + 1) * crop_size, (r + 1) * crop_size))
             for r in range(rows) for c in range(cols)]
    shown = (global_view.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (C, C, 3)
    tiles.append(Image.fromarray(shown))

    # Patches wholly inside the padding are masked: floor(pad / patch) of them per axis.
    m = crop_size // patch_size
    canvas_mask = torch.ones(rows * m, cols * m, dtype=torch.bool)  # (rows*m, cols*m) over the canvas patches
    if pad_w // patch_size:
        canvas_mask[:, -(pad_w // patch_size):] = False
    if pad_h // patch_size:
        canvas_mask[-(pad_h // patch_size):, :] = False
    crop_masks = canvas_mask.reshape(rows, m, cols, m).transpose(1, 2).reshape(rows * cols, m, m)  # (r*c, m, m)
    patch_mask = torch.cat([crop_masks, torch.ones(1, m, m, dtype=torch.bool)])  # global view last
    valid_rows = _valid_pooled(rows, m, pad_h // patch_size)
    valid_cols = _valid_pooled(cols, m, pad_w // patch_size)
    return TiledImage(
        tiles=tiles, grid=(rows, cols),
        num_tokens=phi4_num_tokens(rows, cols, side, valid_rows, valid_cols),
        has_global=True, sub_token_grid=(valid_rows, valid_cols), crop_size=crop_size, mode="phi4",
        mean=tuple(mean), std=tuple(std), global_view=global_view, patch_mask=patch_mask,
    )


# ---------------------------------------------------------------------------------------------
# InternVL


def internvl_tokens_per_tile(image_size: int = 448, patch_size: int = 14, downsample: float = 0.5) -> int:
    """``(C/patch * downsample)^2``: 448/14 = 32 patches -> pixel shuffle 0.5 -> 16x16 = 256."""
    m = image_size // patch_size
    k = round(1 / downsample)
    if m % k:
        raise ConfigError(f"image_size {image_size} / patch_size {patch_size} = {m} patches per side is not "
                          f"divisible by the pixel-shuffle factor {k}; choose sizes with an even patch grid")
    return (m // k) ** 2


@TILERS.register("internvl")
def internvl_tiles(image: Image.Image, image_size: int = 448, min_num: int = 1, max_num: int = 12,
                   use_thumbnail: bool = True, patch_size: int = 14,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> TiledImage:
    """InternVL ``dynamic_preprocess`` of one image (``max_num`` 12 at inference, 6 in its fine-tuning
    scripts). Resizes use PIL's bicubic filter, as InternVL does (``Image.resize`` default and
    ``T.Resize(..., BICUBIC)``)."""
    image = _check_image(image)
    if not 1 <= min_num <= max_num:
        raise ConfigError(f"internvl tiling needs 1 <= min_num <= max_num, got min_num={min_num}, max_num={max_num}")
    per_tile = internvl_tokens_per_tile(image_size, patch_size)
    width, height = image.size
    cols, rows = closest_aspect_grid(width, height, candidate_grids(min_num, max_num), image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = [resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
             for r in range(rows) for c in range(cols)]
    has_global = use_thumbnail and len(tiles) != 1
    if has_global:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    side = math.isqrt(per_tile)
    return TiledImage(
        tiles=tiles, grid=(rows, cols), num_tokens=per_tile * len(tiles), has_global=has_global,
        sub_token_grid=(rows * side, cols * side), crop_size=image_size, mode="internvl",
        mean=tuple(mean), std=tuple(std),
    )


# ---------------------------------------------------------------------------------------------
# Video


def frame_indices(num_available: int, n: int) -> list[int]:
    """Indices of ``n`` frames spread uniformly: the middle frame of each of ``n`` equal segments.

    Same scheme as InternVL's ``get_index`` (segment midpoints), written so that ``n <=
    num_available`` never repeats a frame. When ``n > num_available`` frames repeat, which keeps
    the token count of a video fixed at ``n`` frames.
    """
    if num_available < 1:
        raise DataError(None, None, "video has no frames", reason="empty_video")
    if n < 1:
        raise ConfigError(f"number of frames to sample must be >= 1, got {n}")
    return [min(num_available - 1, int((k + 0.5) * num_available / n)) for k in range(n)]


def sample_frames(frames: Sequence, n: int) -> list:
    """``n`` frames of ``frames`` picked by :func:`frame_indices`."""
    return [frames[i] for i in frame_indices(len(frames), n)]


def video_tiles(frames: Sequence[Image.Image], num_frames: int = 8, image_size: int = 448, patch_size: int = 14,
                mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> list[TiledImage]:
    """A video as ``num_frames`` single-tile images (InternVL's video path: each sampled frame goes
    through ``dynamic_preprocess`` with ``max_num=1``, one tile and no thumbnail, 256 tokens)."""
    return [internvl_tiles(f, image_size=image_size, min_num=1, max_num=1, use_thumbnail=False,
                           patch_size=patch_size, mean=mean, std=std)
            for f in sample_frames(frames, num_frames)]
