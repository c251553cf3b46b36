"""Export training checkpoints to standard Hugging Face directories, and merge LoRA adapters.

A checkpoint written by the trainer (``OUTPUT/checkpoints/step-XXXXXXXX/`` or ``OUTPUT/final/``)::

    model/            model.save_pretrained: a PEFT adapter (adapter_config.json +
                      adapter_model.safetensors) or, for full fine-tuning, a full model
    tokenizer/        tokenizer.save_pretrained
    recipe.yaml       the recipe that trained it
    trainer_state.pt  optimizer / scheduler / RNG state for resuming
    meta.json         {"step": N, "adapter": "lora" | "none", "base_model": "<base dir>"}

:func:`export_checkpoint` turns one into a self-contained directory that
``peft.PeftModel.from_pretrained`` (adapter) or ``AutoModelForCausalLM.from_pretrained`` (full)
loads, with the tokenizer beside it (like ``xtuner convert pth_to_hf``).
:func:`merge_adapter` folds a LoRA adapter into its base weights (PEFT ``merge_and_unload``)
and writes a full model directory (like ``xtuner convert merge`` /
``llamafactory-cli export``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import MMTuneError
from .models.loading import resolve_model_path

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MERGE_DTYPES = ("float32", "bfloat16", "float16")


def find_checkpoint(path: str | Path) -> Path | None:
    """The checkpoint directory ``path`` names, or None if it names none.

    ``path`` may be a checkpoint itself (has ``meta.json``) or a run's output directory, in
    which case ``final/`` is preferred, then the highest ``checkpoints/step-N``.
    """
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    if (p / "final" / "meta.json").is_file():
        return p / "final"
    steps = []
    for d in (p / "checkpoints").glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", d.name)
        if m and (d / "meta.json").is_file():
            steps.append((int(m.group(1)), d))
    return max(steps)[1] if steps else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Like :func:`find_checkpoint`, but a path that names no checkpoint is an error."""
    p = Path(path)
    if not p.exists():
        raise MMTuneError(f"checkpoint path '{p}' does not exist")
    ckpt = find_checkpoint(p)
    if ckpt is None:
        raise MMTuneError(f"'{p}' is not an mmtune checkpoint: no {p / 'meta.json'} (give OUTPUT/final, "
                          "OUTPUT/checkpoints/step-N or the run's OUTPUT directory)")
    return ckpt


def read_meta(ckpt: Path) -> dict:
    """``meta.json`` of a checkpoint, checked for the keys export needs."""
    path = Path(ckpt) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except OSError:
        raise MMTuneError(f"checkpoint '{ckpt}' has no {path}") from None
    except ValueError as e:
        raise MMTuneError(f"{path}: invalid JSON: {e}") from None
    for key in ("adapter", "base_model"):
        if key not in meta:
            raise MMTuneError(f"{path}: missing key '{key}'")
    if meta["adapter"] not in ("lora", "none"):
        raise MMTuneError(f"{path}: 'adapter' is {meta['adapter']!r}; expected 'lora' or 'none'")
    return meta


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise MMTuneError(f"{what}: missing {path}")
    return path


def _require_adapter(adapter_dir: Path) -> None:
    _require(adapter_dir / "adapter_config.json", "LoRA adapter")
    if not any((adapter_dir / w).is_file() for w in ADAPTER_WEIGHTS):
        raise MMTuneError(f"LoRA adapter: missing {adapter_dir / ADAPTER_WEIGHTS[0]}")


def _copy_files(src: Path, dst: Path) -> None:
    """Copy the files (and folders) of ``src`` into ``dst`` without overwriting what is there."""
    for item in sorted(src.iterdir()):
        target = dst / item.name
        if target.exists():
            continue
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)


class _AtomicDir:
    """Write into a temporary sibling of ``out`` and rename it into place on success, so a
    failed export never leaves a half-written directory that looks complete."""

    def __init__(self, out: str | Path, overwrite: bool):
        self.out = Path(out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())) and not overwrite:
            raise MMTuneError(f"output directory '{self.out}' exists and is not empty; choose another or "
                              "pass overwrite=True (--overwrite)")
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}-", dir=self.out.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.out.exists():
            if self.out.is_dir():
                shutil.rmtree(self.out)
            else:
                self.out.unlink()
        os.replace(self.tmp, self.out)


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a checkpoint as a standard Hugging Face directory (adapter or full model) with
    its tokenizer, and the training recipe as ``mmtune_recipe.yaml``.

    For LoRA, ``base_model_name_or_path`` in ``adapter_config.json`` is set to the base model
    the checkpoint was trained from (``meta.json``), so ``PeftModel.from_pretrained`` and
    :func:`merge_adapter` find it without being told.
    """
    ckpt = resolve_checkpoint(ckpt_dir)
    meta = read_meta(ckpt)
    model_dir = _require(ckpt / "model", "checkpoint")
    if meta["adapter"] == "lora":
        _require_adapter(model_dir)
    else:
        _require(model_dir / "config.json", "full fine-tuned checkpoint")
    tok_dir = _require(ckpt / "tokenizer", "checkpoint")
    with _AtomicDir(out_dir, overwrite) as tmp:
        _copy_files(model_dir, tmp)
        _copy_files(tok_dir, tmp)
        if (ckpt / "recipe.yaml").is_file():
            shutil.copy2(ckpt / "recipe.yaml", tmp / "mmtune_recipe.yaml")
        if meta["adapter"] == "lora":
            cfg_path = tmp / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = str(meta["base_model"])
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer_config.json").is_file()


def _resolve_merge_inputs(base_dir, adapter_dir) -> tuple[Path, Path | None, Path | None]:
    """(base model dir, adapter dir or None for a full checkpoint, tokenizer dir or None)."""

    src = Path(adapter_dir)
    if not src.exists():
        raise MMTuneError(f"adapter path '{src}' does not exist")
    ckpt = find_checkpoint(src)
    if ckpt is not None:
        meta = read_meta(ckpt)
        model_dir = _require(ckpt / "model", "checkpoint")
        tok = ckpt / "tokenizer" if _has_tokenizer(ckpt / "tokenizer") else None
        if meta["adapter"] == "none":  # nothing to merge: the checkpoint is the full model
            return resolve_model_path(model_dir), None, tok
        _require_adapter(model_dir)
        base = base_dir if base_dir is not None else meta["base_model"]
        return resolve_model_path(base), model_dir, tok
    _require_adapter(src)
    if base_dir is None:
        base_dir = json.loads((src / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base_dir:
            raise MMTuneError(f"{src / 'adapter_config.json'} has no base_model_name_or_path: give the base "
                              "model directory")
    return resolve_model_path(base_dir), src, src if _has_tokenizer(src) else None


def merge_adapter(base_dir: str | Path | None, adapter_dir: str | Path, out_dir: str | Path,
                  max_shard_size: str = "2GB", dtype: str = "float32", overwrite: bool = False) -> Path:
    """Merge a LoRA adapter into its base model and save a full model directory.

    ``adapter_dir`` is an adapter directory (:func:`export_checkpoint` output or any PEFT
    adapter), a trainer checkpoint, or a run's output directory. ``base_dir`` may be None when
    the adapter names its base (``meta.json`` / ``base_model_name_or_path``). The merge is done
    in float32 and the result cast to ``dtype``, so a bfloat16 export rounds once. Weights are
    written as safetensors shards of at most ``max_shard_size``; the tokenizer is taken from
    the checkpoint or adapter directory when it has one, else from the base model.
    A full fine-tuning checkpoint has nothing to merge and is re-saved in ``dtype``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in MERGE_DTYPES:
        raise MMTuneError(f"merge dtype {dtype!r} is not allowed; allowed values: {', '.join(MERGE_DTYPES)}")
    base, adapter, tok_dir = _resolve_merge_inputs(base_dir, adapter_dir)
    target = getattr(torch, dtype)
    # Fail on an occupied out_dir before the (slow) load.
    atomic = _AtomicDir(out_dir, overwrite)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=False).merge_and_unload()
    model = model.to(target)
    model.config.dtype = target
    tokenizer = AutoTokenizer.from_pretrained(tok_dir or base, local_files_only=True)
    with atomic as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
