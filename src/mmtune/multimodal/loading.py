"""Loading a saved composed model (:func:`load_composed`), finding one (:func:`find_composed`), and
writing a copy with one modality adapter merged into the LM (:func:`merge_composed`).

Each component file is rebuilt by the modality path that declares the component
(:meth:`~mmtune.multimodal.modalities.ModalityPath.load_component`), the paths in the order the
file lists them; directories written before modalities were paths load unchanged (same layout,
same component names).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import MMTuneError
from ..models.loading import resolve_dtype, set_offline
from .checkpoint import CONFIG_FILE, FORMAT, PROCESSOR_FILE
from .composed import ComposedModel
from .modalities import owner_of
from .router import ModalityRouter


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError:
        raise MMTuneError(f"{path} not found: not a composed model directory (written by ComposedModel.save)") from None
    except ValueError as e:
        raise MMTuneError(f"{path}: invalid JSON ({e})") from None


def _load_weights(directory: Path, name: str, module: nn.Module, state: dict) -> nn.Module:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise MMTuneError(f"{directory / (name + '.safetensors')}: weights do not match {CONFIG_FILE}: "
                          f"{str(e).splitlines()[0]}") from None
    return module


def _paths(d: Path, info: dict, proc: dict, torch_dtype: torch.dtype) -> dict:
    from safetensors.torch import load_file

    modules: dict[str, dict[str, nn.Module]] = {}
    owners = {}
    for comp, desc in info["components"].items():
        cls = owner_of(comp)
        if cls is None:
            raise MMTuneError(f"{d / CONFIG_FILE}: component '{comp}' belongs to no registered modality")
        module = cls.load_component(d, comp, desc)
        module = _load_weights(d, comp, module, load_file(str(d / f"{comp}.safetensors"))).to(torch_dtype)
        modules.setdefault(cls.name, {})[comp] = module
        owners[cls.name] = cls
    return {name: cls.from_saved(modules[name], proc.get(name), info.get(f"{name}_token"))
            for name, cls in owners.items()}


def load_composed(directory: str | os.PathLike, dtype: str = "float32", device: str | None = None,
                  trainable: bool = False) -> ComposedModel:
    """Inverse of :meth:`ComposedModel.save`. ``trainable=False`` freezes every parameter and
    returns the model in eval mode; ``True`` leaves trainability to a stage."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = Path(directory)
    info = _read_json(d / CONFIG_FILE)
    if info.get("format") != FORMAT:
        raise MMTuneError(f"{d / CONFIG_FILE}: format is {info.get('format')!r}, expected {FORMAT!r}")
    proc = _read_json(d / PROCESSOR_FILE)
    set_offline()
    torch_dtype = resolve_dtype(dtype)
    lm = AutoModelForCausalLM.from_pretrained(d / "language_model", dtype=torch_dtype, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(d / "tokenizer", local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    adapters = info.get("adapters", [])
    if adapters:
        from peft import PeftModel

        first, *rest = adapters
        lm = PeftModel.from_pretrained(lm, d / "adapters" / first, adapter_name=first, is_trainable=trainable)
        for name in rest:
            lm.load_adapter(d / "adapters" / name, adapter_name=name, is_trainable=trainable)
    model = ComposedModel(lm, tokenizer, ModalityRouter.from_dict(info["router"]),
                          _paths(d, info, proc, torch_dtype), spec=info.get("multimodal", {}))
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def find_composed(path: str | Path) -> Path | None:
    """The composed model directory ``path`` names: itself, or a run's ``final``."""
    p = Path(path)
    for cand in (p, p / "final"):
        if (cand / CONFIG_FILE).is_file():
            return cand
    return None


def merge_composed(directory: str | os.PathLike, adapter_name: str | None, out: str | os.PathLike,
                   overwrite: bool = False) -> Path:
    """Write a copy of the composed model at ``directory`` to ``out``.

    ``adapter_name=None`` keeps the modality adapters separate, as Phi-4-multimodal ships them
    (base weights shared, the router picks per input). With a name, that adapter is folded into
    the LM weights (PEFT ``merge_and_unload``) and all adapters are dropped: every input then
    runs the merged weights, text included, and the router routes everything to the base, i.e.
    the merged model. Merging one adapter changes text behaviour; that is the price of a
    single set of weights.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MMTuneError(f"output directory '{out}' exists and is not empty; choose another or pass overwrite=True")
    model = load_composed(directory, device="cpu")
    if adapter_name is not None:
        lm = model.language_model
        names = sorted(lm.peft_config) if hasattr(lm, "peft_config") else []
        if adapter_name not in names:
            raise MMTuneError(f"{directory}: no adapter '{adapter_name}' to merge; adapters: {', '.join(names) or 'none'}")
        lm.set_adapter(adapter_name)
        model.language_model = lm.merge_and_unload(adapter_names=[adapter_name])
        table = {g: None for g in model.router.table}
        model.router = ModalityRouter(table, model.router.vision_speech, groups=tuple(table))
        spec = copy.deepcopy(model.spec)
        spec["adapters"] = []
        spec["router"] = {"text": "none", "image": "none", "audio": "none", "image_audio": "none"}
        spec["merged_adapter"] = adapter_name
        model.spec = spec
    model.save(out)
    return out
