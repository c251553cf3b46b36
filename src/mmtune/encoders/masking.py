"""Masked-language-model masking and the batches built from encoder sequences.

Masking follows Devlin et al. 2019, section 3.1 and appendix A.1: each non-special token is
selected with probability ``mlm_probability`` (0.15); a selected token becomes the mask token with
probability 0.8, a random token with 0.1 and stays unchanged with 0.1; the loss is computed on
the selected tokens only (label = original id, -100 elsewhere). Random replacements are drawn
uniformly from the non-special vocabulary, so a special token never appears where text was.

Whole-word masking selects words instead of tokens (every sub-word token of a selected word),
then applies the 80/10/10 rule per token as Google's ``create_pretraining_data.py`` does.

Static masks (BERT) are drawn once per sequence from a generator seeded by (seed, sequence,
copy), so they do not depend on data order; dynamic masks (RoBERTa) are drawn in the collate
function from the ``rng`` generator the training loop seeds by (seed, epoch, batch index).
"""

from __future__ import annotations

import torch

IGNORE = -100


def mask_tokens(input_ids: torch.Tensor, special_mask: torch.Tensor, *, mask_id: int, random_ids: torch.Tensor,
                rng: torch.Generator, mlm_probability: float = 0.15, mask_fraction: float = 0.8,
                random_fraction: float = 0.1, word_ids: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``input_ids`` (any shape) and return ``(masked_ids, labels)``.

    ``special_mask`` is True at special and padding positions (never selected); ``random_ids`` holds
    the ids a random replacement may take; ``word_ids`` (same shape, -1 at specials, word index
    unique within a row otherwise) switches on whole-word masking.
    """
    if word_ids is None:
        selected = torch.rand(input_ids.shape, generator=rng) < mlm_probability
    else:
        rows = word_ids.reshape(-1, word_ids.shape[-1])  # (B, T)
        n_words = int(rows.max()) + 1 if rows.numel() else 0
        pick = torch.rand((rows.shape[0], max(n_words, 1)), generator=rng) < mlm_probability  # (B, W)
        selected = torch.gather(pick, 1, rows.clamp(min=0)).reshape(word_ids.shape) & (word_ids >= 0)
    selected &= ~special_mask
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE))
    action = torch.rand(input_ids.shape, generator=rng)
    to_mask = selected & (action < mask_fraction)
    to_random = selected & (action >= mask_fraction) & (action < mask_fraction + random_fraction)
    random_tokens = random_ids[torch.randint(len(random_ids), input_ids.shape, generator=rng)]
    masked = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(to_random, random_tokens, masked)
    return masked, labels


def static_generator(seed: int, index: int, copy: int = 0) -> torch.Generator:
    """The generator of sequence ``index``'s static mask number ``copy``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) * 131 + copy)


class MLMCollator:
    """``list[row] -> batch`` for MLM-based objectives (mlm, mlm_nsp, mlm_sop, electra).

    A row is a dict with ``input_ids``, ``token_type_ids``, ``special_mask``, ``word_ids`` (lists)
    and optionally ``label`` (NSP/SOP), ``id`` (its index) and, when masked statically,
    ``masked_ids`` and ``labels``. The batch holds the masked ``input_ids``, ``labels``,
    ``original_ids`` (unmasked, for ELECTRA), ``attention_mask``, ``token_type_ids``,
    ``special_mask``, ``pair_labels`` when rows carry one, and ``row_id``. Rows without a stored
    mask are masked here, from ``rng`` (dynamic masking).
    """

    def __init__(self, *, pad_id: int, mask_id: int, random_ids: list[int], mlm_probability: float = 0.15,
                 mask_fraction: float = 0.8, random_fraction: float = 0.1, whole_word: bool = False):
        self.pad_id, self.mask_id = pad_id, mask_id
        self.random_ids = torch.tensor(random_ids, dtype=torch.long)
        self.p, self.mask_fraction, self.random_fraction = mlm_probability, mask_fraction, random_fraction
        self.whole_word = whole_word

    def mask(self, ids: torch.Tensor, special: torch.Tensor, word_ids: torch.Tensor, rng: torch.Generator):
        return mask_tokens(ids, special, mask_id=self.mask_id, random_ids=self.random_ids, rng=rng,
                           mlm_probability=self.p, mask_fraction=self.mask_fraction,
                           random_fraction=self.random_fraction, word_ids=word_ids if self.whole_word else None)

    def mask_row(self, row: dict, rng: torch.Generator) -> dict:
        """``row`` with a static mask (``masked_ids``, ``labels``) drawn from ``rng``."""
        masked, labels = self.mask(torch.tensor(row["input_ids"]), torch.tensor(row["special_mask"]),
                                   torch.tensor(row["word_ids"]), rng)
        return {**row, "masked_ids": masked.tolist(), "labels": labels.tolist()}

    def _pad(self, rows: list[dict], key: str, value) -> torch.Tensor:
        width = max(len(r["input_ids"]) for r in rows)
        return torch.tensor([list(r[key]) + [value] * (width - len(r[key])) for r in rows])

    def __call__(self, rows: list[dict], rng: torch.Generator | None = None) -> dict:
        original = self._pad(rows, "input_ids", self.pad_id)  # (B, T)
        special = self._pad(rows, "special_mask", True)
        attention = torch.tensor([[1] * len(r["input_ids"]) + [0] * (original.shape[1] - len(r["input_ids"]))
                                  for r in rows])  # (B, T)
        if "masked_ids" in rows[0]:  # masked statically at preprocessing
            masked = self._pad(rows, "masked_ids", self.pad_id)
            labels = self._pad(rows, "labels", IGNORE)
        else:
            # Evaluation batches get no generator from the loop: a fixed one keeps eval losses comparable.
            rng = rng if rng is not None else torch.Generator().manual_seed(0)
            masked, labels = self.mask(original, special, self._pad(rows, "word_ids", -1), rng)
        batch = {"input_ids": masked, "labels": labels, "original_ids": original, "attention_mask": attention,
                 "token_type_ids": self._pad(rows, "token_type_ids", 0), "special_mask": special}
        if "label" in rows[0]:
            batch["pair_labels"] = torch.tensor([r["label"] for r in rows])
        if "id" in rows[0]:
            batch["row_id"] = torch.tensor([r["id"] for r in rows])
        return batch
