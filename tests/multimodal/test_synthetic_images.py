"""Synthetic image data: deterministic by seed, and every answer recoverable from the pixels."""

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from mmtune.errors import ConfigError
from mmtune.multimodal.synthetic_images import (
    BACKGROUND,
    COLORS,
    POSITIONS,
    make_ocr_dataset,
    make_shapes_dataset,
    render_text,
    save_dataset,
)
from mmtune.multimodal.tiling import internvl_tiles, phi4_crops


def same(a, b):
    keys = ("caption", "question", "answer")
    return all(x[k] == y[k] for x, y in zip(a, b) for k in keys) and all(
        x["image"].tobytes() == y["image"].tobytes() for x, y in zip(a, b))


def test_deterministic_by_seed_and_prefix_stable():
    assert same(make_shapes_dataset(6, seed=3, size=64), make_shapes_dataset(6, seed=3, size=64))
    assert not same(make_shapes_dataset(6, seed=3, size=64), make_shapes_dataset(6, seed=4, size=64))
    assert same(make_shapes_dataset(3, seed=3, size=64), make_shapes_dataset(6, seed=3, size=64)[:3])
    assert same(make_ocr_dataset(4, seed=1, size=48), make_ocr_dataset(4, seed=1, size=48))
    assert not same(make_ocr_dataset(4, seed=1, size=48), make_ocr_dataset(4, seed=2, size=48))


def read_scene(image: Image.Image):
    """Shapes found in the pixels: (kind, colour, cell) per connected blob of non-white pixels.

    Kind from how much of its bounding box a blob fills: square ~1, circle ~pi/4, triangle ~1/2.
    """
    arr = np.asarray(image)
    ink = (arr != BACKGROUND).any(-1)
    labels, n = ndimage.label(ink)
    found = []
    size = arr.shape[0]
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        blob = labels[sl] == k
        fill = blob.sum() / blob.size
        kind = "triangle" if fill < 0.65 else "circle" if fill < 0.92 else "square"
        rgb = tuple(int(v) for v in arr[sl][blob][0])
        colour = next(name for name, c in COLORS.items() if c == rgb)
        cy, cx = ndimage.center_of_mass(labels == k)
        found.append((kind, colour, (int(cy // (size / 3)), int(cx // (size / 3)))))
    return found


def test_shapes_answers_match_the_pixels():
    records = make_shapes_dataset(90, seed=0, size=96)
    assert {r["qtype"] for r in records} == {"color", "count", "position"}
    for r in records:
        scene = read_scene(r["image"])
        assert sorted(scene) == sorted((s["kind"], s["color"], tuple(s["cell"])) for s in r["shapes"])
        words = r["question"].rstrip("?").split()
        target = words[2][:-1] if r["qtype"] == "count" else words[-1]
        if r["qtype"] == "color":  # "What color is the circle?"
            (colour,) = [c for k, c, _ in scene if k == target]
            assert r["answer"] == colour
        elif r["qtype"] == "count":  # "How many squares are there?"
            assert r["answer"] == str(sum(k == target for k, _, _ in scene))
            assert 1 <= int(r["answer"]) <= 4
        else:  # "Where is the triangle?"
            ((kind, _, cell),) = scene
            assert kind == target and POSITIONS[r["answer"]] == cell
        for kind, colour, _ in scene:  # the caption names what is drawn
            assert colour in r["caption"] and kind in r["caption"]


def test_ocr_answer_is_what_was_drawn():
    for wide in (False, True):
        for r in make_ocr_dataset(12, seed=5, size=64, wide=wide):
            w, h = r["image"].size
            assert (w, h) == ((256, 64) if wide else (64, 64))
            again = render_text(r["answer"], w, h, fill=r["ink"], background=r["paper"], offset=r["offset"])
            assert again.tobytes() == r["image"].tobytes()
            other = render_text(r["answer"] + "7", w, h, fill=r["ink"], background=r["paper"], offset=r["offset"])
            assert other.tobytes() != r["image"].tobytes()
            ink = (np.asarray(r["image"]) != r["paper"]).any(-1)
            ys, xs = np.nonzero(ink)
            assert xs.min() > 0 and ys.min() > 0 and xs.max() < w - 1 and ys.max() < h - 1  # not clipped
            assert (xs.max() - xs.min()) > 0.5 * w  # large enough to read
            if wide:
                assert len(r["answer"].split()) >= 3


def test_wide_ocr_images_need_several_tiles():
    (r,) = make_ocr_dataset(1, seed=0, size=448, wide=True)
    assert phi4_crops(r["image"]).grid == (1, 4)
    assert internvl_tiles(r["image"]).grid == (1, 4)


def test_save_dataset_llava_jsonl(tmp_path):
    records = make_shapes_dataset(3, seed=1, size=64) + make_ocr_dataset(2, seed=1, size=48)
    path = save_dataset(records, tmp_path, "mixed")
    assert path == tmp_path / "mixed.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 5
    for rec, line in zip(records, lines):
        assert not line["image"].startswith("/") and (tmp_path / line["image"]).is_file()
        assert Image.open(tmp_path / line["image"]).convert("RGB").tobytes() == rec["image"].tobytes()
        human, gpt = line["conversations"]
        assert human == {"from": "human", "value": "<image>\n" + rec["question"]}
        assert gpt == {"from": "gpt", "value": rec["answer"]}
    caps = [json.loads(x) for x in save_dataset(records, tmp_path, "caps", task="caption").read_text().splitlines()]
    assert [c["conversations"][1]["value"] for c in caps] == [r["caption"] for r in records]
    with pytest.raises(ConfigError, match="task"):
        save_dataset(records, tmp_path, "x", task="qa")
