"""The ``final/`` directory of an encoder run: the mmtune encoder directory (every weight, heads and
LoRA included) plus ``hf/`` (LoRA merged; ELECTRA: the discriminator, and ``hf-generator/``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from ...config import Recipe
from ..models import EncoderModule, quiet_transformers


def _merged(net):
    """A copy of ``net`` with LoRA merged into the base weights (``net`` itself if no LoRA)."""
    if hasattr(net, "merge_and_unload"):
        return copy.deepcopy(net).merge_and_unload()
    return net


def export_final(module: EncoderModule, tokenizer, recipe: Recipe, out: Path, metrics: dict | None = None) -> Path:
    """Write ``out`` (see the module docstring): the mmtune encoder directory plus ``hf/``."""
    out = Path(out)
    module.save_pretrained(out)
    tokenizer.save_pretrained(out / "tokenizer")
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
    (out / "metrics.json").write_text(json.dumps(metrics or {}, indent=1, default=str))
    net = module.net
    kind = module.spec["kind"]
    if kind == "electra":
        pairs = [(net.discriminator, out / "hf"), (net.generator, out / "hf-generator")]
    elif kind == "pretrain":
        pairs = [(_merged(net.model), out / "hf")]
    else:
        pairs = [(_merged(net.backbone), out / "hf")]
    with quiet_transformers():
        for model, where in pairs:
            model.save_pretrained(str(where))
            tokenizer.save_pretrained(str(where))
    return out
