"""Built-in image data, drawn in code with PIL (no downloads), deterministic by seed.

``shapes``: circles, squares and triangles in five colours on a white 3x3 layout, with a
caption and one checkable question per image, of three kinds:

- colour: "What color is the circle?" (exactly one circle) -> "red";
- count: "How many squares are there?" (1-4 squares among other shapes) -> "3";
- position: "Where is the triangle?" (a single shape at the left/right/top/bottom) -> "left".

``ocr``: a short word or number rendered with PIL's default font; "What is written in the
image?" -> the text. ``wide=True`` gives 4:1 images with a longer text, which need several
tiles at any crop size.

Record ``i`` of a dataset depends only on ``(seed, i)``, so a longer dataset extends a shorter one.
Each record also keeps what was drawn (``shapes`` or ``text``) so answers can be checked.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..data.builtin import WORDS
from ..errors import ConfigError

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 20),
    "purple": (140, 60, 180),
}
KINDS = ("circle", "square", "triangle")
# Cell (row, col) of the 3x3 layout that each position word names.
POSITIONS = {"left": (1, 0), "right": (1, 2), "top": (0, 1), "bottom": (2, 1)}
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
BACKGROUND = (255, 255, 255)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], rgb) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=rgb)
    elif kind == "square":
        draw.rectangle(box, fill=rgb)
    else:  # triangle, apex up
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)


def _shape_box(rng: random.Random, cell: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """A square box inside ``cell`` of the 3x3 layout, 45-65% of the cell, randomly placed."""
    cell_px = size / 3
    side = int(cell_px * rng.uniform(0.45, 0.65))
    slack = int(cell_px - side) - 2
    x0 = int(cell[1] * cell_px) + 1 + rng.randint(0, max(slack, 0))
    y0 = int(cell[0] * cell_px) + 1 + rng.randint(0, max(slack, 0))
    return x0, y0, x0 + side - 1, y0 + side - 1


def _plural(kind: str, n: int) -> str:
    return kind if n == 1 else kind + "s"


def _caption(shapes: list[dict]) -> str:
    if len(shapes) == 1:
        s = shapes[0]
        where = next((p for p, cell in POSITIONS.items() if cell == s["cell"]), None)
        return f"A {s['color']} {s['kind']}" + (f" {_WHERE[where]}." if where else ".")
    groups: dict[tuple[str, str], int] = {}
    for s in shapes:
        groups[(s["color"], s["kind"])] = groups.get((s["color"], s["kind"]), 0) + 1
    parts = [f"{NUMBER_WORDS[n]} {color} {_plural(kind, n)}" for (color, kind), n in sorted(groups.items())]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def _shapes_record(rng: random.Random, size: int) -> dict:
    qtype = rng.choice(("color", "count", "position"))
    target = rng.choice(KINDS)
    others = [k for k in KINDS if k != target]
    cells = [(r, c) for r in range(3) for c in range(3)]
    rng.shuffle(cells)
    if qtype == "position":
        where = rng.choice(sorted(POSITIONS))
        plan = [(target, rng.choice(sorted(COLORS)), POSITIONS[where])]
        question, answer = f"Where is the {target}?", where
    elif qtype == "color":
        color = rng.choice(sorted(COLORS))
        plan = [(target, color, cells[0])]
        plan += [(rng.choice(others), rng.choice(sorted(COLORS)), cells[1 + i]) for i in range(rng.randint(0, 3))]
        question, answer = f"What color is the {target}?", color
    else:
        count = rng.randint(1, 4)
        plan = [(target, rng.choice(sorted(COLORS)), cells[i]) for i in range(count)]
        plan += [(rng.choice(others), rng.choice(sorted(COLORS)), cells[count + i]) for i in range(rng.randint(0, 2))]
        question, answer = f"How many {target}s are there?", str(count)

    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    shapes = []
    for kind, color, cell in plan:
        box = _shape_box(rng, cell, size)
        _draw_shape(draw, kind, box, COLORS[color])
        shapes.append({"kind": kind, "color": color, "cell": cell, "box": box})
    return {"image": image, "caption": _caption(shapes), "question": question, "answer": answer,
            "qtype": qtype, "shapes": shapes}


def make_shapes_dataset(n: int, seed: int = 0, size: int = 224) -> list[dict]:
    """``n`` records ``{image, caption, question, answer, qtype, shapes}``; ``size`` >= 48 px."""
    if size < 48:
        raise ConfigError(f"shapes images need size >= 48 px to draw recognisable shapes, got {size}")
    return [_shapes_record(random.Random(f"shapes-{seed}-{i}"), size) for i in range(n)]


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


def render_text(text: str, width: int, height: int, fill=(0, 0, 0), background=BACKGROUND,
                offset: tuple[float, float] = (0.5, 0.5)) -> Image.Image:
    """``text`` in PIL's default font, as large as fits in 80% x 60% of the image.

    ``offset`` places the text in the free space (0 = left/top, 1 = right/bottom). Pillow's
    default font is a scalable FreeType font when Pillow has FreeType (the PyPI wheels do);
    otherwise the fixed bitmap font is drawn and the image is scaled up.
    """
    probe = _font(100)
    if not isinstance(probe, ImageFont.FreeTypeFont):  # bitmap fallback: draw small, scale up
        x0, y0, x1, y1 = probe.getbbox(text)
        small = Image.new("RGB", (x1 - x0 + 4, y1 - y0 + 4), background)
        ImageDraw.Draw(small).text((2 - x0, 2 - y0), text, font=probe, fill=fill)
        scale = min(0.8 * width / small.width, 0.6 * height / small.height)
        small = small.resize((max(1, int(small.width * scale)), max(1, int(small.height * scale))),
                             Image.Resampling.NEAREST)
        image = Image.new("RGB", (width, height), background)
        image.paste(small, (int((width - small.width) * offset[0]), int((height - small.height) * offset[1])))
        return image
    x0, y0, x1, y1 = probe.getbbox(text)
    px = max(6, int(100 * min(0.8 * width / (x1 - x0), 0.6 * height / (y1 - y0))))
    font = _font(px)
    x0, y0, x1, y1 = font.getbbox(text)
    image = Image.new("RGB", (width, height), background)
    left = (width - (x1 - x0)) * offset[0] - x0
    top = (height - (y1 - y0)) * offset[1] - y0
    ImageDraw.Draw(image).text((left, top), text, font=font, fill=fill)
    return image


INKS = ((0, 0, 0), (20, 20, 120), (110, 20, 20), (20, 90, 30))
PAPERS = ((255, 255, 255), (245, 240, 225), (230, 240, 250))


def _ocr_record(rng: random.Random, size: int, wide: bool) -> dict:
    def token() -> str:
        return rng.choice(WORDS) if rng.random() < 0.5 else str(rng.randint(10, 99999))

    text = " ".join(token() for _ in range(rng.randint(3, 4))) if wide else token()
    width, height = (4 * size, size) if wide else (size, size)
    ink, paper = rng.choice(INKS), rng.choice(PAPERS)
    offset = (rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))
    image = render_text(text, width, height, fill=ink, background=paper, offset=offset)
    return {"image": image, "caption": f'The image shows the text "{text}".',
            "question": "What is written in the image?", "answer": text, "qtype": "ocr", "text": text,
            "ink": ink, "paper": paper, "offset": offset}


def make_ocr_dataset(n: int, seed: int = 0, size: int = 224, wide: bool = False) -> list[dict]:
    """``n`` records ``{image, caption, question, answer, text, ...}``; wide images are 4:1."""
    if size < 16:
        raise ConfigError(f"ocr images need size >= 16 px, got {size}")
    return [_ocr_record(random.Random(f"ocr-{seed}-{int(wide)}-{i}"), size, wide) for i in range(n)]


def save_dataset(records: list[dict], root: str | Path, name: str, task: str = "vqa") -> Path:
    """Write the images as PNG under ``root/name/`` and a LLaVA-style JSONL ``root/name.jsonl``.

    Each line: ``{"id", "image": "name/00000.png" (relative to root), "conversations":
    [{"from": "human", "value": "<image>\\n<question>"}, {"from": "gpt", "value": <answer>}]}``.
    ``task="caption"`` asks for a description and answers with the caption instead (alignment
    data for training a projector, LLaVA stage 1).
    """
    if task not in ("vqa", "caption"):
        raise ConfigError(f"task must be 'vqa' or 'caption', got {task!r}")
    root = Path(root)
    (root / name).mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            rel = f"{name}/{i:05d}.png"
            rec["image"].save(root / rel)
            if task == "vqa":
                prompt, reply = rec["question"], rec["answer"]
            else:
                prompt, reply = "Describe the image briefly.", rec["caption"]
            line = {"id": f"{name}-{i:05d}", "image": rel,
                    "conversations": [{"from": "human", "value": f"<image>\n{prompt}"},
                                      {"from": "gpt", "value": reply}]}
            f.write(json.dumps(line) + "\n")
    return path
