"""The network of an encoder run: ELECTRA's generator + discriminator, a pretraining model with its
heads, or a downstream head on a backbone, with pretrained weights where the model has them and
the recipe's adapter (LoRA) and freezing applied."""

from __future__ import annotations

from pathlib import Path

from ...config import Recipe
from ...errors import ConfigError
from .. import downstream
from ..config import EncoderConfig
from ..models import (
    EncoderModule,
    PretrainingHeads,
    apply_adapter,
    load_hf_model,
    new_modules,
    quiet_transformers,
    resolve_model_path,
)
from .prepare import PRETRAIN_OBJECTIVES, Prepared


def _new_weight_patterns(missing: list[str]) -> list[str]:
    return [f"*{k}" for k in missing]


def build_encoder_module(recipe: Recipe, prep: Prepared) -> EncoderModule:
    """The network for the recipe's objective with pretrained weights where the model has them."""
    enc = recipe.encoder or EncoderConfig()
    objective, tok = recipe.objective, prep.tokenizer
    from_scratch = resolve_model_path(recipe.model.path)[0] == "builtin"
    adapter = recipe.adapter.model_dump(mode="json")
    base = {"adapter": adapter, "freeze": list(recipe.model.freeze), "objective": objective,
            "base_model": recipe.model.path}
    max_len = recipe.data.max_length
    if objective == "electra":
        from transformers import ElectraForMaskedLM

        from ..electra import ElectraPretrainer, generator_config

        if recipe.adapter.type != "none":
            raise ConfigError("objective electra trains generator and discriminator in full; set adapter.type: none")
        disc, _ = load_hf_model(recipe.model, "disc", tok, max_len, enc)
        gen_dir = _generator_dir(recipe.model.path)
        if gen_dir is not None:
            with quiet_transformers():
                gen = ElectraForMaskedLM.from_pretrained(str(gen_dir))
        else:
            gen = ElectraForMaskedLM(generator_config(disc.config, enc.generator_size))
        special = sorted(set(tok.all_special_ids))
        net = ElectraPretrainer(gen, disc, special)
        spec = {"kind": "electra", **base, "special_ids": special,
                "configs": {"generator": gen.config.to_dict(), "discriminator": disc.config.to_dict()}}
        module = EncoderModule(net, spec)
    elif objective in PRETRAIN_OBJECTIVES:
        hf, missing = load_hf_model(recipe.model, "pair" if objective != "mlm" else "mlm", tok, max_len, enc)
        spec = {"kind": "pretrain", **base, "hf_class": type(hf).__name__, "configs": {"model": hf.config.to_dict()},
                "always_train": _new_weight_patterns(missing), "new_weights": missing}
        net = apply_adapter(hf, recipe.adapter, lora_attr=None, always_train=spec["always_train"],
                            freeze=recipe.model.freeze, from_scratch=from_scratch, new_modules=new_modules(missing))
        module = EncoderModule(PretrainingHeads(net), spec)
    else:
        backbone, missing = load_hf_model(recipe.model, "base", tok, max_len, enc)
        kind = objective
        spec = {"kind": kind, **base, "backbone_class": type(backbone).__name__,
                "configs": {"backbone": backbone.config.to_dict()}, "pooling": enc.pooling,
                "dropout": enc.classifier_dropout, "num_labels": len(prep.label_names) if kind == "classify" else 1,
                "labels": prep.label_names,
                "always_train": downstream.HEAD_PARAMS[kind] + [f"backbone.*{k}" for k in missing],
                "new_weights": missing}
        net = apply_adapter(downstream.make_net(kind, backbone, spec), recipe.adapter, lora_attr="backbone",
                            always_train=spec["always_train"], freeze=recipe.model.freeze, from_scratch=from_scratch,
                            new_modules=new_modules(missing))
        module = EncoderModule(net, spec)
    if recipe.model.gradient_checkpointing:
        for m in module.modules():
            if hasattr(m, "gradient_checkpointing_enable") and getattr(m, "supports_gradient_checkpointing", False):
                m.gradient_checkpointing_enable()
    return module


def _generator_dir(model_path: str) -> Path | None:
    kind, where = resolve_model_path(model_path)
    if kind == "dir" and Path(where).name == "hf" and (Path(where).parent / "hf-generator").is_dir():
        return Path(where).parent / "hf-generator"
    return None
