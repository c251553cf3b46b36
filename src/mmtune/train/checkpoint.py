"""Atomic, resumable checkpoints.

Layout of one checkpoint (``OUTPUT/checkpoints/step-00000012/``)::

    model/              model.save_pretrained(): a PEFT adapter dir, a full HF model dir, or
                        model.safetensors for a plain torch module
    tokenizer/          tokenizer.save_pretrained(), when there is a tokenizer
    recipe.yaml         the validated recipe the run used
    trainer_state.pt    optimizer, scheduler, RNG states, data position, counters
    meta.json           {"step", "adapter", "base_model", ...}; written last

A checkpoint is written into ``.tmp-step-*`` and renamed into place only when complete, so
``--resume`` can never pick up a half-written one; older ones beyond ``keep_last`` are pruned.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step-(\d+)$")


def _is_hf(model) -> bool:
    return hasattr(model, "save_pretrained")


def save_model(model, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if _is_hf(model):
        model.save_pretrained(out, safe_serialization=True)
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))


def load_model_weights(model, src: Path) -> None:
    """Load weights written by :func:`save_model` into an already built ``model``."""
    src = Path(src)
    if (src / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict

        weights = load_file(str(src / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights)
        return
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors) in {src}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head) are saved once by save_pretrained; everything else must match.
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {src} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and
             (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(output_dir: str | Path, step: int, model, trainer_state: dict, *, tokenizer=None,
                    recipe: dict | None = None, meta: dict | None = None, keep_last: int = 2,
                    name: str | None = None) -> Path:
    """Write a complete checkpoint atomically and prune old ones. Returns its directory."""
    root = Path(output_dir) / "checkpoints" if name is None else Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final_name = name or f"step-{step:08d}"
    tmp = root / f".tmp-{final_name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, tmp / "model")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "tokenizer")
    if recipe is not None:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    torch.save(trainer_state, tmp / "trainer_state.pt")
    info = {"step": step, **(meta or {})}
    (tmp / "meta.json").write_text(json.dumps(info, indent=1))
    dest = root / final_name
    if dest.exists():
        old = root / f".old-{final_name}-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    if name is None:
        for old in checkpoint_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=False)
