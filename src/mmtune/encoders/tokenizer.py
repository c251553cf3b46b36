"""Tokenizers for encoders: train one on the corpus when none is given, and lay out special tokens.

A trained tokenizer is a ``tokenizers`` model wrapped in transformers' fast tokenizer, saved with
the model (``tokenizer/`` in every checkpoint and the final directory) and reloaded with
``AutoTokenizer.from_pretrained``:

- ``wordpiece``: BERT's normaliser and pre-tokeniser, ``[CLS] A [SEP] B [SEP]`` with token types
  0/1 (BERT, ALBERT, ELECTRA).
- ``bpe``: byte-level BPE as in GPT-2/RoBERTa, ``<s> A </s></s> B </s>``, no token types.

:class:`Layout` reads where a tokenizer puts its special tokens (by encoding a probe pair), so
sequences assembled from pre-tokenized segments (pairs.py) match what the tokenizer itself
produces, whatever the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

WORDPIECE_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                      "mask_token": "[MASK]"}
BPE_SPECIALS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>"}


# Training marks every non-initial character of a word with a private-use code point instead of
# the trainer's "##" prefix (see _train_wordpiece_vocab).
_MARK = 0xF0000  # Supplementary Private Use Area-A (U+F0000..U+FFFFD)


def _mark(c: str) -> str:
    return chr(_MARK + ord(c)) if ord(c) < 0xFFFE else c


def _unmark(piece: str) -> str:
    cont = ord(piece[0]) >= _MARK and ord(piece[0]) - _MARK < 0xFFFE
    text = "".join(chr(ord(c) - _MARK) if ord(c) >= _MARK and ord(c) - _MARK < 0xFFFE else c for c in piece)
    return "##" + text if cont else text


def _train_wordpiece_vocab(texts, vocab_size: int, lowercase: bool, specials: list[str]) -> dict[str, int]:
    """A WordPiece vocabulary learned as tokenizers' WordPieceTrainer learns it (BPE in which a
    word's non-initial characters are distinct "##" symbols, then WordPiece.from_bpe), but
    deterministic.

    tokenizers 0.23's WordPieceTrainer creates the "##" symbols while iterating a hash map, so their
    ids, and through merge tie-breaking the vocabulary itself, change from run to run
    (huggingface/tokenizers#1794). Here the continuation characters are private-use code points,
    part of the alphabet the trainer sorts, so equal data give an equal vocabulary.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    norm, pre = normalizers.BertNormalizer(lowercase=lowercase), pre_tokenizers.BertPreTokenizer()

    def marked(text: str) -> str:
        words = [w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text))]
        return " ".join(w[0] + "".join(_mark(c) for c in w[1:]) for w in words)

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator((marked(t) for t in texts),
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    vocab = {(p if p in specials else _unmark(p)): i for p, i in bpe.get_vocab().items()}
    for piece in list(vocab):  # characters outside the BMP were not marked: allow them inside words too
        if len(piece) == 1 and ord(piece) >= 0xFFFE and "##" + piece not in vocab:
            vocab["##" + piece] = len(vocab)
    return vocab


def train_tokenizer(texts: Iterable[str], kind: str = "wordpiece", vocab_size: int = 4000,
                    lowercase: bool = True):
    """A fast tokenizer trained on ``texts``; equal texts in equal order give an equal tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if kind == "wordpiece":
        specials = list(dict.fromkeys(WORDPIECE_SPECIALS.values()))
        tk = Tokenizer(models.WordPiece(vocab=_train_wordpiece_vocab(texts, vocab_size, lowercase, specials),
                                        unk_token="[UNK]"))
        tk.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tk.decoder = decoders.WordPiece()
        cls, sep = tk.token_to_id("[CLS]"), tk.token_to_id("[SEP]")
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return PreTrainedTokenizerFast(tokenizer_object=tk, **WORDPIECE_SPECIALS,
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    if kind == "bpe":
        specials = list(dict.fromkeys(BPE_SPECIALS.values()))
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tk.decoder = decoders.ByteLevel()
        tk.train_from_iterator(texts, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tk.post_processor = processors.RobertaProcessing(("</s>", tk.token_to_id("</s>")),
                                                         ("<s>", tk.token_to_id("<s>")),
                                                         trim_offsets=True, add_prefix_space=True)
        return PreTrainedTokenizerFast(tokenizer_object=tk, **BPE_SPECIALS,
                                       model_input_names=["input_ids", "attention_mask"])
    raise ConfigError(f"encoder.tokenizer_type '{kind}' is not one of: wordpiece, bpe")


def load_tokenizer(path: str | Path):
    """A fast tokenizer from a directory (offsets and word ids are needed: slow ones are refused)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"tokenizer directory '{path}' does not exist (encoder.tokenizer or the model dir)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from '{path}': {e}") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"the tokenizer in '{path}' is not a fast (tokenizers-backed) tokenizer; encoders "
                          "need offsets and word ids; save it with a tokenizer.json")
    if tok.mask_token_id is None or tok.pad_token_id is None:
        raise ConfigError(f"the tokenizer in '{path}' has no mask or pad token; BERT-family objectives need both")
    return tok


@dataclass(frozen=True)
class Layout:
    """Where a tokenizer puts special tokens around one or two segments.

    ``single = pre + A + post``; ``pair = pre + A + mid + B + post``; token types per part.
    """

    pre: tuple[int, ...]
    post_single: tuple[int, ...]
    mid: tuple[int, ...]
    post_pair: tuple[int, ...]
    types_pair: tuple[int, int, int, int, int]  # token type of pre, A, mid, B, post
    uses_token_types: bool

    @classmethod
    def of(cls, tokenizer) -> Layout:
        probe_a, probe_b = "a", "b"
        one = tokenizer(probe_a)
        two = tokenizer(probe_a, probe_b)
        ids1, seq1 = one["input_ids"], one.sequence_ids()
        ids2, seq2 = two["input_ids"], two.sequence_ids()
        types2 = two.get("token_type_ids", [0] * len(ids2))
        a1 = [i for i, s in enumerate(seq1) if s == 0]
        a2 = [i for i, s in enumerate(seq2) if s == 0]
        b2 = [i for i, s in enumerate(seq2) if s == 1]
        pre = tuple(ids2[: a2[0]])
        return cls(pre=pre, post_single=tuple(ids1[a1[-1] + 1:]), mid=tuple(ids2[a2[-1] + 1: b2[0]]),
                   post_pair=tuple(ids2[b2[-1] + 1:]),
                   types_pair=(types2[0], types2[a2[0]], types2[a2[-1] + 1], types2[b2[0]], types2[-1]),
                   uses_token_types="token_type_ids" in two)

    def n_special(self, pair: bool) -> int:
        return len(self.pre) + (len(self.mid) + len(self.post_pair) if pair else len(self.post_single))

    def build(self, a: list[int], b: list[int] | None = None) -> tuple[list[int], list[int], list[bool], list[int]]:
        """(input_ids, token_type_ids, special_mask, segment index: -1 special, 0 for A, 1 for B)."""
        if b is None:
            parts = [(self.pre, 0, -1), (a, 0, 0), (self.post_single, 0, -1)]
        else:
            tp = self.types_pair
            parts = [(self.pre, tp[0], -1), (a, tp[1], 0), (self.mid, tp[2], -1), (b, tp[3], 1),
                     (self.post_pair, tp[4], -1)]
        ids, types, special, seg = [], [], [], []
        for toks, t, s in parts:
            ids.extend(toks)
            types.extend([t] * len(toks))
            special.extend([s < 0] * len(toks))
            seg.extend([s] * len(toks))
        return ids, types, special, seg


def tokenize_sentences(tokenizer, sentences: list[str], batch: int = 2048) -> list[tuple[list[int], list[bool]]]:
    """Token ids of every sentence (no specials) and, per token, whether it starts a word."""
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i:i + batch], add_special_tokens=False)
        for j, ids in enumerate(enc["input_ids"]):
            words = enc.word_ids(j)
            starts = [k == 0 or words[k] != words[k - 1] for k in range(len(ids))]
            out.append((ids, starts))
    return out


def non_special_ids(tokenizer) -> list[int]:
    """Ids a random replacement may take: the whole vocabulary minus special and added tokens."""
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return [i for i in range(len(tokenizer)) if i not in special]
