"""Fixtures of the inference tests: the tiny text model and a tiny composed model, each with
perturbed weights so that greedy output is varied text (the random tiny model repeats one
token), and a small image."""

from __future__ import annotations

import pytest
import torch


def perturb(model, seed: int = 1, scale: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="session")
def tiny_lm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmtune.models.tiny import ensure_tiny

    path = ensure_tiny()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    perturb(model)
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def composed(tmp_path_factory):
    """builtin:tiny + tiny SigLIP + tiny Conformer with a vision and a speech LoRA; every weight
    LM weight perturbed, and LoRA B and the projectors (so the vision route differs from the text
    route)."""
    from mmtune.multimodal.model import tiny_composed

    torch.manual_seed(0)
    model = tiny_composed(cache_root=tmp_path_factory.mktemp("cache")).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            scale = 0.05 if (".lora_B." in n or "projector" in n) else 0.1 if n.startswith("language_model") else 0
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def image_file(tmp_path_factory):
    from mmtune.multimodal.synthetic_images import make_shapes_dataset

    path = tmp_path_factory.mktemp("media") / "square.png"
    make_shapes_dataset(1, seed=3, size=64)[0]["image"].save(path)
    return path
