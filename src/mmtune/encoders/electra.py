"""ELECTRA replaced-token detection (Clark et al. 2020): a small generator and a discriminator.

The generator is a masked LM; its samples replace the masked tokens, and the discriminator
classifies every token of the result as original (0) or replaced (1). A sampled token that equals
the original counts as original (section 2: "if the generator happens to generate the correct
token, that token is considered real"). The generator is trained by its MLM loss only: sampling
is not differentiable and the discriminator loss is not back-propagated through it (section 2).

Generator and discriminator share the token, position and token-type embeddings (section 3.1,
"weight sharing"; Google's code reuses the ``embeddings`` scope): here both models hold the very
same ``embeddings`` module, and the generator's output layer is tied to its word embeddings, so
all three are one tensor. The generator is narrower (``generator_size`` x the discriminator's
hidden width, heads and feed-forward width; section 3.2 finds 1/4 to 1/2 best) and reads the
shared embeddings through its own ``embeddings_project``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .masking import IGNORE
from .models import NETS, EncoderModule, build_from_config


def generator_config(disc_config, size: float):
    """The generator's config: the discriminator's, ``size`` times narrower, same embedding width."""
    from transformers import ElectraConfig

    heads = max(1, round(disc_config.num_attention_heads * size))
    head_dim = max(1, round(disc_config.hidden_size * size / heads))
    d = disc_config.to_dict()
    d.update(hidden_size=heads * head_dim, num_attention_heads=heads,
             intermediate_size=max(1, round(disc_config.intermediate_size * size)),
             embedding_size=disc_config.embedding_size)
    return ElectraConfig.from_dict(d)


def replace_masked(masked_ids: torch.Tensor, labels: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """The discriminator's input: ``masked_ids`` with every selected position (label != -100) set to
    the generator's sample (``sampled``: one id per selected position, in row-major order)."""
    out = masked_ids.clone()
    out[labels != IGNORE] = sampled
    return out


def rtd_labels(disc_ids: torch.Tensor, original_ids: torch.Tensor) -> torch.Tensor:
    """1 where the discriminator's input differs from the original text, else 0 (kept tokens and
    samples equal to the original count as original)."""
    return (disc_ids != original_ids).long()


@dataclass
class ElectraOutput:
    gen_logits: torch.Tensor  # (N, V) at the N selected positions
    gen_labels: torch.Tensor  # (N,)
    disc_logits: torch.Tensor  # (B, T)
    disc_labels: torch.Tensor  # (B, T)
    disc_ids: torch.Tensor  # (B, T)


class ElectraPretrainer(nn.Module):
    """Generator (``ElectraForMaskedLM``) + discriminator (``ElectraForPreTraining``), embeddings shared."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module, special_ids: list[int] = ()):
        super().__init__()
        if generator.config.embedding_size != discriminator.config.embedding_size:
            raise ValueError("generator and discriminator must have the same embedding_size to share embeddings")
        generator.electra.embeddings = discriminator.electra.embeddings
        generator.generator_lm_head.weight = discriminator.electra.embeddings.word_embeddings.weight
        self.generator = generator
        self.discriminator = discriminator
        self.register_buffer("special_ids", torch.tensor(sorted(special_ids), dtype=torch.long), persistent=False)

    def forward(self, input_ids, attention_mask, labels, original_ids, token_type_ids=None) -> ElectraOutput:
        gen = self.generator
        hidden = gen.electra(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state  # (B, T, Hg)
        selected = labels != IGNORE
        gen_logits = gen.generator_lm_head(gen.generator_predictions(hidden[selected]))  # (N, V)
        with torch.no_grad():
            logits = gen_logits.detach().float()
            if self.special_ids.numel():
                logits[:, self.special_ids] = float("-inf")  # never sample [CLS], [SEP], [MASK], padding
            sampled = torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(-1)  # (N,)
            disc_ids = replace_masked(input_ids, labels, sampled)
            disc_labels = rtd_labels(disc_ids, original_ids)
        disc_logits = self.discriminator(input_ids=disc_ids, attention_mask=attention_mask,
                                         token_type_ids=token_type_ids).logits  # (B, T)
        return ElectraOutput(gen_logits, labels[selected], disc_logits, disc_labels, disc_ids)


@NETS.register("electra")
def _electra_net(spec: dict) -> EncoderModule:
    gen = build_from_config("ElectraForMaskedLM", spec["configs"]["generator"])
    disc = build_from_config("ElectraForPreTraining", spec["configs"]["discriminator"])
    return EncoderModule(ElectraPretrainer(gen, disc, spec.get("special_ids", [])), spec)
