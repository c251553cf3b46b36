"""The ``encoder:`` section of a recipe: BERT-family pretraining and downstream settings.

Everything else an encoder recipe needs comes from the shared sections: ``model.path`` (a local
Hugging Face directory or a ``builtin:NAME`` from :data:`mmtune.encoders.models.BUILTIN_MODELS`),
``adapter`` (LoRA or full), ``data.sources`` / ``data.eval_sources`` (files or ``builtin:NAME``
corpora and tasks), ``data.max_length`` (tokens per sequence, specials included) and ``train``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ..schema import Section


class EncoderConfig(Section):
    # --- size of a model built in code (``model.path: builtin:...``); null keeps the built-in size
    hidden_size: int | None = Field(None, gt=0, description="Hidden width of a built-in model (must divide by "
                                    "num_heads).")
    num_layers: int | None = Field(None, gt=0, description="Transformer layers of a built-in model.")
    num_heads: int | None = Field(None, gt=0, description="Attention heads of a built-in model.")
    intermediate_size: int | None = Field(None, gt=0, description="Feed-forward width of a built-in model.")
    embedding_size: int | None = Field(None, gt=0, description="Factorised embedding width (ALBERT, ELECTRA) "
                                       "of a built-in model.")

    # --- tokenizer
    tokenizer: str | None = Field(None, description="Tokenizer directory. Null: the model directory's own "
                                  "tokenizer, or (for a built-in model) one trained on the training texts and "
                                  "saved with the model.")
    tokenizer_type: Literal["auto", "wordpiece", "bpe"] = Field(
        "auto", description="Kind of tokenizer to train: WordPiece (BERT, ALBERT, ELECTRA) or byte-level BPE "
        "(RoBERTa). `auto` picks by architecture.")
    vocab_size: int = Field(4000, ge=100, description="Vocabulary size of a trained tokenizer.")
    lowercase: bool = Field(True, description="Lowercase text in a trained WordPiece tokenizer.")

    # --- corpus (pretraining objectives)
    corpus_format: Literal["auto", "lines", "paragraphs"] = Field(
        "auto", description="Plain-text files: `lines` = one document per line; `paragraphs` = documents "
        "separated by blank lines; `auto` = paragraphs if the file has a blank line between two text lines.")

    # --- masked language modelling
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="Fraction of non-special tokens selected for "
                                   "prediction (Devlin et al. 2019, section 3.1).")
    mask_token_fraction: float = Field(0.8, ge=0, le=1, description="Of the selected tokens, the fraction "
                                       "replaced by the mask token.")
    random_token_fraction: float = Field(0.1, ge=0, le=1, description="Of the selected tokens, the fraction "
                                         "replaced by a random non-special token (the rest stay unchanged).")
    masking: Literal["static", "dynamic"] = Field(
        "static", description="`static`: masks drawn once at preprocessing (BERT); `dynamic`: re-drawn every "
        "time a sequence is batched, from the loop's seeded generator (RoBERTa, Liu et al. 2019 section 4.1).")
    mask_copies: int = Field(1, ge=1, description="With static masking: keep this many copies of every "
                             "sequence, each with its own pre-drawn mask (RoBERTa's static baseline used 10).")
    whole_word_mask: bool = Field(False, description="Select whole words: all sub-word tokens of a selected "
                                  "word are predicted together.")
    pair_probability: float = Field(0.5, gt=0, lt=1, description="NSP: probability that segment B comes from "
                                    "another document; SOP: probability that the two segments are swapped.")

    # --- ELECTRA replaced-token detection
    generator_size: float = Field(0.25, gt=0, le=1, description="Generator width (hidden size, heads, "
                                  "feed-forward) as a fraction of the discriminator's. Clark et al. 2020 "
                                  "section 3.2: 1/4 to 1/2 of the discriminator works best.")
    rtd_weight: float = Field(50.0, gt=0, description="lambda in loss = MLM + lambda * RTD (Clark et al. 2020, "
                              "equation 1 and appendix A).")

    # --- downstream heads
    pooling: Literal["cls", "mean"] = Field("cls", description="Sentence vector for classification and the "
                                            "bi-encoder: the first ([CLS]) token, or the mean over real tokens.")
    classifier_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before a classification head.")
    doc_stride: int = Field(32, gt=0, description="QA: tokens of overlap between windows of a long passage.")
    max_answer_tokens: int = Field(30, gt=0, description="QA: longest answer span considered at inference.")
    similarity_loss: Literal["contrastive", "cosine_mse"] = Field(
        "contrastive", description="Bi-encoder loss on the cosine of the two pooled vectors: `contrastive` "
        "(Hadsell et al. 2006 on cosine distance; a pair is similar when its score >= similarity_threshold) "
        "or `cosine_mse` (cosine regressed onto the score scaled to [0, 1]).")
    contrastive_margin: float = Field(0.5, gt=0, description="Cosine-distance margin for dissimilar pairs "
                                      "(sentence-transformers' ContrastiveLoss default).")
    score_range: tuple[float, float] = Field((0.0, 5.0), description="Range of similarity scores in the data "
                                             "(STS-B: 0..5); scores are scaled to [0, 1] with it.")
    similarity_threshold: float | None = Field(None, description="Score at or above which a pair counts as "
                                               "similar for the contrastive loss; null = middle of score_range.")

    @model_validator(mode="after")
    def _check(self) -> EncoderConfig:
        if self.mask_token_fraction + self.random_token_fraction > 1:
            raise ValueError("encoder.mask_token_fraction + encoder.random_token_fraction must be <= 1 "
                             f"(got {self.mask_token_fraction} + {self.random_token_fraction})")
        if self.mask_copies > 1 and self.masking != "static":
            raise ValueError("encoder.mask_copies > 1 pre-draws several static masks per sequence; it needs "
                             "encoder.masking: static (dynamic masks are re-drawn every epoch anyway)")
        lo, hi = self.score_range
        if not hi > lo:
            raise ValueError(f"encoder.score_range must be (low, high) with high > low, got {self.score_range}")
        if self.hidden_size is not None and self.num_heads is not None and self.hidden_size % self.num_heads:
            raise ValueError(f"encoder.hidden_size ({self.hidden_size}) must be divisible by encoder.num_heads "
                             f"({self.num_heads})")
        return self

    @property
    def threshold(self) -> float:
        lo, hi = self.score_range
        return self.similarity_threshold if self.similarity_threshold is not None else (lo + hi) / 2
