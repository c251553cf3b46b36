"""Saving a composed model: the directory layout :func:`~mmtune.multimodal.loading.load_composed`
reads, and the single-file training state ``--resume`` reads.

Layout (:func:`save_composed`)::

    mmtune_composed.json      what to rebuild: config, token ids, components, adapters, router
    processor.json            each modality's preprocessing settings, by modality name
    language_model/           the base LM (save_pretrained; LoRA weights removed)
    adapters/<name>/          one PEFT adapter directory per modality adapter
    tokenizer/                the tokenizer with the placeholder tokens
    <component>.safetensors   one file per modality component (vision_encoder, vision_projector,
                              audio_encoder, audio_projector, audio_projector_vs, ...)

The layout and the component names are those of format version 1 written before modalities
were paths, so every existing directory loads unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .adapters import base_lm

FORMAT = "mmtune-composed"
FORMAT_VERSION = 1
CONFIG_FILE = "mmtune_composed.json"
PROCESSOR_FILE = "processor.json"


def lm_base_state(base: nn.Module) -> dict[str, torch.Tensor]:
    """The base LM's weights without LoRA: PEFT's ``x.base_layer.weight`` back to ``x.weight``,
    ``lora_*`` tensors dropped."""
    out = {}
    for k, v in base.state_dict().items():
        if ".lora_" in k:
            continue
        if ".modules_to_save." in k or ".original_module." in k:
            raise ConfigError(f"cannot save {k}: modules_to_save is not supported for composed-model adapters")
        out[k.replace(".base_layer.", ".")] = v
    return out


def save_composed(model, directory: str | os.PathLike) -> Path:
    """Write ``model`` (a :class:`~mmtune.multimodal.composed.ComposedModel`) in the layout of the
    module docstring into ``directory``, atomically (a temporary sibling renamed into place)."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        lm = model.language_model
        base = base_lm(lm)
        base.save_pretrained(tmp / "language_model", state_dict=lm_base_state(base))
        adapters = sorted(lm.peft_config) if hasattr(lm, "peft_config") else []
        if adapters:
            # The resized embeddings are saved once, with the base LM, not in every adapter.
            lm.save_pretrained(tmp / "adapters", selected_adapters=adapters, save_embedding_layers=False)
            for name in adapters:  # PEFT writes a non-"default" adapter into a subfolder of its name
                if name == "default":
                    raise ConfigError("an adapter may not be named 'default' (PEFT reserves the name)")
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp / "tokenizer")
        components, proc = {}, {"image": None, "audio": None}
        tokens = {"image_token": model.image_token, "audio_token": model.audio_token}
        for name, path in model.modalities.items():
            for comp, module in path.components().items():
                if module is None:
                    continue
                state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
                save_file(state, str(tmp / f"{comp}.safetensors"), metadata={"format": "pt", "component": comp})
                components[comp] = path.describe_component(comp, module)
            proc[name] = path.processor_dict()
            tokens[f"{name}_token"] = path.token
            path.save_files(tmp)
        info = {"format": FORMAT, "version": FORMAT_VERSION, "multimodal": model.spec, "adapters": adapters,
                "router": model.router.to_dict(), **tokens, "components": components,
                "hidden_size": model.hidden_size}
        (tmp / CONFIG_FILE).write_text(json.dumps(info, indent=1))
        (tmp / PROCESSOR_FILE).write_text(json.dumps(proc, indent=1))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            os.replace(out, old / "x")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_state(state: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    """``state`` in one ``model.safetensors`` under ``directory``, each shared tensor (tied
    embeddings) once: the training checkpoint ``--resume`` reads."""
    from safetensors.torch import save_file

    seen, out = set(), {}
    for k, v in state.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous().cpu()
    Path(directory).mkdir(parents=True, exist_ok=True)
    save_file(out, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})
