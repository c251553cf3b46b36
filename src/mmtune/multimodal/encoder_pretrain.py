"""Pretraining the tiny encoders on the built-in data, before they meet a large language model.

A real vision-language model starts from a pretrained vision tower (SigLIP, trained on billions
of image-text pairs) and a pretrained audio encoder; only the projector and the LLM's adapters
learn to connect them (LLaVA, Phi-4-multimodal: docs/reference/multimodal.md#phi-4-training-stages).
The built-in tiny towers are random. Composed with the tiny LM, the staged recipe trains them
from scratch through the LM (cheap: a step costs milliseconds). Composed with a 135M-parameter
LM on a CPU, a step costs seconds, so the encoders are first pretrained here on the same built-in
data with a direct objective, a few hundred steps of the towers alone:

- vision: the SigLIP tower's ``feature_layer`` features, average-pooled onto the 3x3 layout of
  the shapes scenes, predict each cell's content (empty or the shape's kind) and the shape's
  colour with a linear head (cross-entropy). Colour, count and position answers are functions
  of those 9 cells.
- audio: the Conformer's outputs predict the spoken digit string with CTC (11 classes: blank and
  the 10 digits; Graves et al. 2006, "Connectionist Temporal Classification").

The heads are thrown away; the towers are saved as ordinary checkpoints (a transformers SigLIP
directory, a :func:`~mmtune.multimodal.conformer.save_conformer` directory) and cached, so
``multimodal.vision.path`` / ``multimodal.audio.path`` take them like any local encoder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..models.tiny import default_cache_root
from ..util import cached_build
from .audio import AUDIO_FEATURES, load_audio, pad_audio_features
from .conformer import save_conformer
from .model import build_audio_encoder, build_vision_tower
from .synthetic_audio import make_spoken_digits_dataset
from .synthetic_images import COLORS, KINDS, make_shapes_dataset
from .tiling import images_to_tensor
from .vision import VisionTower, load_vision_model

BUILD_INFO = "mmtune_encoder_pretrain.json"
VERSION = 1
#: Cells of the shapes layout (3x3) and the classes a cell can hold: empty or one of the kinds.
GRID = 3


def shapes_cell_labels(shapes: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kind (9,), colour (9,))`` class ids of a shapes scene, cell by cell in row-major order:
    kind 0 = empty, 1.. = :data:`~mmtune.multimodal.synthetic_images.KINDS`; colour = index in
    ``sorted(COLORS)``, -100 (ignored) on empty cells."""

    colours = sorted(COLORS)
    kind = torch.zeros(GRID * GRID, dtype=torch.long)
    colour = torch.full((GRID * GRID,), -100, dtype=torch.long)
    for s in shapes:
        i = s["cell"][0] * GRID + s["cell"][1]
        kind[i], colour[i] = KINDS.index(s["kind"]) + 1, colours.index(s["color"])
    return kind, colour


class CellHead(nn.Module):
    """Tower features ``(N, h, w, C)`` -> per-cell kind and colour logits ``(N, 9, K+1)``, ``(N, 9, 5)``."""

    def __init__(self, hidden: int, n_kinds: int, n_colours: int):
        super().__init__()
        self.kind = nn.Linear(hidden, n_kinds + 1)
        self.colour = nn.Linear(hidden, n_colours)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cells = F.adaptive_avg_pool2d(feats.permute(0, 3, 1, 2), GRID).flatten(2).transpose(1, 2)  # (N, 9, C)
        return self.kind(cells), self.colour(cells)


def _fit(params: list[nn.Parameter], batch_loss, steps: int, lr: float, what: str, log) -> list[float]:
    """``steps`` AdamW steps (one-cycle schedule, gradients clipped at 1) on ``batch_loss()``, a
    progress line every 100 steps; returns the losses."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    for step in range(1, steps + 1):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps:
            log(f"  {what} {loss.item():.3f} (step {step}/{steps})")
    return losses


def pretrain_vision_tower(tower_dir: Path, out_dir: Path, *, n_images: int = 1200, steps: int = 300,
                          batch_size: int = 32, lr: float = 2e-3, feature_layer: int = -2, seed: int = 0,
                          image_size: int = 64, log=print) -> dict:
    """Train the SigLIP tower of ``tower_dir`` on shapes scenes (module docstring), save the whole
    tower (all layers, the composed model prunes at load) to ``out_dir``; returns the held-out
    cell accuracies."""

    torch.manual_seed(seed)
    model = load_vision_model(tower_dir)
    tower = VisionTower(model, feature_layer=feature_layer, prune=False)
    records = make_shapes_dataset(n_images + 200, seed=10_000 + seed, size=image_size)
    pixels = images_to_tensor([r["image"] for r in records], tower.image_mean, tower.image_std)  # (N, 3, S, S)
    labels = [shapes_cell_labels(r["shapes"]) for r in records]
    kinds, colours = torch.stack([k for k, _ in labels]), torch.stack([c for _, c in labels])  # (N, 9)
    head = CellHead(tower.hidden_size, len(KINDS), len(COLORS))
    params = list(tower.parameters()) + list(head.parameters())
    rng = random.Random(seed)

    def batch_loss() -> torch.Tensor:
        idx = torch.tensor(rng.sample(range(n_images), batch_size))
        kind_logits, colour_logits = head(tower(pixels[idx]))
        return (F.cross_entropy(kind_logits.flatten(0, 1), kinds[idx].flatten())
                + F.cross_entropy(colour_logits.flatten(0, 1), colours[idx].flatten(), ignore_index=-100))

    tower.train()
    losses = _fit(params, batch_loss, steps, lr, "vision tower pretraining: loss", log)
    tower.eval()
    with torch.no_grad():
        kind_logits, colour_logits = head(tower(pixels[n_images:]))
    k, c = kinds[n_images:], colours[n_images:]
    shown = c != -100
    scores = {"cell_kind_acc": float((kind_logits.argmax(-1) == k).float().mean()),
              "cell_colour_acc": float((colour_logits.argmax(-1) == c)[shown].float().mean()),
              "first_loss": losses[0], "final_loss": losses[-1]}
    model.save_pretrained(out_dir)
    for name in ("preprocessor_config.json",):
        if (Path(tower_dir) / name).is_file():
            (Path(out_dir) / name).write_bytes((Path(tower_dir) / name).read_bytes())
    return scores


def ctc_greedy(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best-path CTC decoding of ``(B, T, classes)``: collapse repeats, drop blanks (class 0)."""
    out = []
    for row, n in zip(log_probs.argmax(-1), lengths.tolist()):
        ids, prev = [], 0
        for t in row[:n].tolist():
            if t != prev and t != 0:
                ids.append(t)
            prev = t
        out.append(ids)
    return out


def pretrain_conformer(out_dir: Path, audio_cfg, work_dir: Path, *, n_clips: int = 600, steps: int = 300,
                       batch_size: int = 16, lr: float = 2e-3, seed: int = 0, log=print) -> dict:
    """Train the builtin Conformer of ``audio_cfg`` (its geometry, its seed) with CTC on spoken digit
    strings (module docstring) and save it to ``out_dir``; returns the held-out exact match."""
    torch.manual_seed(seed)
    encoder = build_audio_encoder(audio_cfg)
    n_eval = min(100, max(8, n_clips // 4))
    make_spoken_digits_dataset(n_clips + n_eval, 20_000 + seed, work_dir, engine="procedural", jsonl_name="asr.jsonl")
    recs = [json.loads(line) for line in (work_dir / "asr.jsonl").read_text().splitlines()]
    features = AUDIO_FEATURES.get(audio_cfg.features)
    feats = [features(torch.as_tensor(load_audio(work_dir / r["audio"]))) for r in recs]  # (T, n_mels) each
    targets = [[int(d) + 1 for d in r["conversations"][1]["value"].split()] for r in recs]
    head = nn.Linear(encoder.hidden_size, 11)
    params = list(encoder.parameters()) + list(head.parameters())
    rng = random.Random(seed)

    def run(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = pad_audio_features([feats[i] for i in idx])
        hidden, out_len = encoder(batch.features, batch.lengths)  # (B, T', d)
        return head(hidden).log_softmax(-1), out_len

    def batch_loss() -> torch.Tensor:
        idx = rng.sample(range(n_clips), batch_size)
        log_probs, out_len = run(idx)
        tgt = torch.tensor([t for i in idx for t in targets[i]])
        tgt_len = torch.tensor([len(targets[i]) for i in idx])
        return F.ctc_loss(log_probs.transpose(0, 1), tgt, out_len, tgt_len, blank=0, zero_infinity=True)

    encoder.train()
    losses = _fit(params, batch_loss, steps, lr, "audio encoder pretraining: CTC loss", log)
    encoder.eval()
    held = list(range(n_clips, n_clips + n_eval))
    with torch.no_grad():
        log_probs, out_len = run(held)
    hits = sum(p == targets[i] for p, i in zip(ctc_greedy(log_probs, out_len), held))
    save_conformer(encoder, out_dir)
    return {"digits_exact_match": hits / n_eval, "first_loss": losses[0], "final_loss": losses[-1]}


def ensure_pretrained_encoders(vision_cfg, audio_cfg, cache_root: Path | None = None, log=print) -> dict[str, Path]:
    """The demo's tiny encoders pretrained on the built-in data (module docstring), built once
    into the cache (atomically): ``{"vision": dir, "audio": dir}``."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    out: dict[str, Path] = {}
    if vision_cfg is not None:
        t = vision_cfg.tiny
        info = {"version": VERSION, "tower": t.model_dump(), "feature_layer": vision_cfg.feature_layer}

        def build_vision(tmp: Path) -> None:
            src = Path(build_vision_tower(vision_cfg.model_copy(update={"path": "builtin:tiny-siglip"}),
                                          cache_root=root).model.name_or_path)
            log("pretraining the tiny vision tower on shapes scenes (once, cached)")
            scores = pretrain_vision_tower(src, tmp, feature_layer=vision_cfg.feature_layer, image_size=t.image_size,
                                           seed=t.seed, log=log)
            (tmp / "pretrain_scores.json").write_text(json.dumps(scores))
            log(f"  held-out cells: kind {scores['cell_kind_acc']:.1%}, colour {scores['cell_colour_acc']:.1%}")

        out["vision"] = cached_build(root / f"tiny-siglip-shapes-v{VERSION}-{t.image_size}-{t.seed}", BUILD_INFO,
                                     info, build_vision)
    if audio_cfg is not None:
        info = {"version": VERSION, "audio": audio_cfg.model_dump(exclude={"path", "lora", "projector"})}

        def build_audio(tmp: Path) -> Path:
            log("pretraining the tiny Conformer on spoken digits with CTC (once, cached)")
            scores = pretrain_conformer(tmp / "model", audio_cfg, tmp / "data", seed=audio_cfg.seed, log=log)
            (tmp / "model" / "pretrain_scores.json").write_text(json.dumps(scores))
            log(f"  held-out digit strings (greedy CTC): {scores['digits_exact_match']:.1%} exact")
            return tmp / "model"

        out["audio"] = cached_build(root / f"tiny-conformer-digits-v{VERSION}-{audio_cfg.seed}", BUILD_INFO, info,
                                    build_audio)
    return out
