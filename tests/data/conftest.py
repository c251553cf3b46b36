"""Shared fixtures for the data-engine tests: small byte-level BPE tokenizers trained in code
(no downloads) carrying the special tokens of every built-in chat template."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# The ChatML Jinja template as shipped in Qwen2-style tokenizer_config.json files (no default system).
CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIALS = ["<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>",
            "<|end|>"]

CORPUS = [
    "hello world, how are you today? I am fine, thank you.",
    "The capital of France is Paris. The capital of Peru is Lima.",
    "What is 7 + 12? The answer is 19. Reverse the words: red cat sun",
    "system user assistant: you are a helpful assistant. Be brief.",
    "Counting: 1 2 3 4 5 6 7 8 9 10. Numbers and words and more words.",
]


def make_tokenizer(chat_template: str | None = None, bos: str | None = "<s>", eos: str = "</s>",
                   specials: list[str] | None = None, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a few lines, wrapped for transformers."""
    specials = SPECIALS if specials is None else specials
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<|endoftext|>")
    hf.add_tokens([s for s in specials if s not in (bos, eos, "<|endoftext|>")], special_tokens=True)
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """Qwen-style: no BOS, EOS <|im_end|>, a ChatML Jinja chat_template."""
    return make_tokenizer(CHATML_JINJA, bos=None, eos="<|im_end|>")


@pytest.fixture(scope="session")
def plain_tokenizer():
    """No chat_template; BOS <s>, EOS </s>; the special tokens of every built-in template."""
    return make_tokenizer(None)


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def write_json(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f, indent=1)
    return str(path)


def supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive supervised token ids."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != -100:
            assert lab == t, "a supervised label must equal its input id"
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.fixture(scope="session")
def h():
    """Helper functions for the tests (test modules do not import conftest: other test folders have
    their own conftest.py and the module name would clash)."""
    from types import SimpleNamespace

    return SimpleNamespace(make_tokenizer=make_tokenizer, write_jsonl=write_jsonl, write_json=write_json,
                           supervised_runs=supervised_runs, CHATML_JINJA=CHATML_JINJA)
