"""Chat templates: parity with the published Jinja templates rendered by transformers, and exactly
which tokens are supervised."""

from __future__ import annotations

import pytest

from mmtune.data.templates import add_template_tokens, get_template, missing_special_tokens
from mmtune.errors import ConfigError

# The published chat templates (tokenizer_config.json of each model), used as references.
PUBLISHED = {
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
        "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
        "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # internlm/internlm2-chat-7b
    "internlm2": (
        "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # microsoft/Phi-3-mini-4k-instruct
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}
TERMINATOR = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "internlm2": "<|im_end|>", "phi3": "<|end|>"}

CONVERSATIONS = [
    [{"role": "user", "content": "What is 7 + 12?"}, {"role": "assistant", "content": "The answer is 19."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "how are you today?"},
     {"role": "assistant", "content": "I am fine, thank you."}],
    [{"role": "user", "content": "Reverse the words: red cat sun"}, {"role": "assistant", "content": "sun cat red"},
     {"role": "user", "content": "Counting:"}, {"role": "assistant", "content": "1 2 3"},
     {"role": "user", "content": "more words"}, {"role": "assistant", "content": "Numbers and words."}],
]


def _assistant(conv):
    return [m["content"] for m in conv if m["role"] == "assistant"]


@pytest.mark.parametrize("name", ["auto", "chatml"])
@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_chatml_matches_apply_chat_template_and_supervises_content_plus_im_end(chatml_tokenizer, h, name, conv):
    tok = chatml_tokenizer
    t = get_template(name, tok)
    ids, labels = t.encode(conv)
    assert ids == tok.apply_chat_template(conv, tokenize=True)["input_ids"]
    assert t.render(conv) == tok.apply_chat_template(conv, tokenize=False)
    runs = h.supervised_runs(ids, labels)
    expected = [tok(c + "<|im_end|>", add_special_tokens=False)["input_ids"] for c in _assistant(conv)]
    assert runs == expected  # exactly each assistant content + <|im_end|>, nothing else
    assert [tok.decode(r) for r in runs] == [c + "<|im_end|>" for c in _assistant(conv)]
    assert labels[0] == -100 and len(labels) == len(ids)


def test_auto_finds_the_same_spans_as_chatml_for_every_loss_on(chatml_tokenizer):
    auto, chatml = get_template("auto", chatml_tokenizer), get_template("chatml", chatml_tokenizer)
    assert auto.name == "auto" and chatml.name == "chatml"
    for conv in CONVERSATIONS:
        for loss_on in ("assistant", "last_turn", "all"):
            assert auto.encode(conv, loss_on) == chatml.encode(conv, loss_on)


@pytest.mark.parametrize("conv", CONVERSATIONS[1:])
def test_loss_on_variants(chatml_tokenizer, h, conv):
    t = get_template("chatml", chatml_tokenizer)
    ids, last = t.encode(conv, "last_turn")
    assert h.supervised_runs(ids, last) == [chatml_tokenizer(_assistant(conv)[-1] + "<|im_end|>",
                                                             add_special_tokens=False)["input_ids"]]
    ids_all, every = t.encode(conv, "all")
    assert ids_all == ids and every[0] == -100 and every[1:] == ids[1:]
    with pytest.raises(ConfigError, match="loss_on"):
        t.encode(conv, "prompt")


@pytest.mark.parametrize("name", ["chatml", "llama3", "internlm2", "phi3"])
def test_builtin_templates_match_published_jinja(plain_tokenizer, h, name):
    """Our built-ins render exactly what the published Jinja renders (via transformers), tokens
    included, and supervise exactly each assistant content (trimmed for llama3) + terminator. The
    tokenizer's own copy of the published Jinja (`auto`) finds the same supervised tokens."""
    tok = plain_tokenizer
    jinja = PUBLISHED.get(name, h.CHATML_JINJA)
    t = get_template(name, tok)
    for conv in CONVERSATIONS:
        assert t.render(conv) == tok.apply_chat_template(conv, chat_template=jinja, tokenize=False)
        assert t.prompt_text(conv[:-1]) == tok.apply_chat_template(conv[:-1], chat_template=jinja, tokenize=False,
                                                                   add_generation_prompt=True)
        ids, labels = t.encode(conv)
        assert ids == tok.apply_chat_template(conv, chat_template=jinja, tokenize=True)["input_ids"]
        trim = name == "llama3"
        expected = [tok((c.strip() if trim else c) + TERMINATOR[name], add_special_tokens=False)["input_ids"]
                    for c in _assistant(conv)]
        assert h.supervised_runs(ids, labels) == expected
        # the inference prompt is a prefix of the training sequence: train and serve agree
        prompt = t.prompt_ids(conv[:-1])
        assert ids[: len(prompt)] == prompt and len(prompt) < len(ids)
        assert t.render_prompt(conv[:-1]) == prompt
    own = h.make_tokenizer(jinja)
    auto = get_template("auto", own)
    builtin = get_template(name, own)
    for conv in CONVERSATIONS:
        for loss_on in ("assistant", "last_turn"):
            assert auto.encode(conv, loss_on) == builtin.encode(conv, loss_on), (name, loss_on)
    assert auto.stop_token_ids[0] == own.convert_tokens_to_ids(TERMINATOR[name])


def test_llama3_exact_string(plain_tokenizer):
    conv = [{"role": "system", "content": " S "}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]
    t = get_template("llama3", plain_tokenizer)
    assert t.render(conv) == ("<s><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                              "<|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
                              "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>")


def test_stop_token_ids(plain_tokenizer, chatml_tokenizer):
    ids = plain_tokenizer.convert_tokens_to_ids
    assert get_template("chatml", plain_tokenizer).stop_token_ids == [ids("<|im_end|>"), ids("</s>")]
    assert get_template("llama3", plain_tokenizer).stop_token_ids == [ids("<|eot_id|>"), ids("<|end_of_text|>"),
                                                                      ids("</s>")]
    assert get_template("phi3", plain_tokenizer).stop_token_ids == [ids("<|end|>"), ids("<|endoftext|>"), ids("</s>")]
    # a tokenizer whose EOS is the terminator lists it once
    assert get_template("auto", chatml_tokenizer).stop_token_ids == [chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_default_system_prompt(chatml_tokenizer):
    t = get_template("chatml", chatml_tokenizer, system_prompt="You are helpful.")
    conv = CONVERSATIONS[0]
    assert t.render(conv).startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\n")
    assert t.prompt_text(conv[:1]).startswith("<|im_start|>system\nYou are helpful.<|im_end|>")
    own = CONVERSATIONS[1]  # has its own system prompt: kept, no second one
    assert t.render(own).count("<|im_start|>system") == 1 and "Be brief." in t.render(own)
    auto = get_template("auto", chatml_tokenizer, system_prompt="You are helpful.")
    assert auto.encode(conv) == t.encode(conv)


def test_auto_without_chat_template_is_chatml(plain_tokenizer):
    assert get_template("auto", plain_tokenizer).name == "chatml"


def test_missing_special_tokens_and_unknown_names(h):
    tok = h.make_tokenizer(None, specials=["<|endoftext|>", "<s>", "</s>"])
    with pytest.raises(ConfigError, match=r"'llama3' needs the special tokens <\|start_header_id\|>"):
        get_template("llama3", tok)
    with pytest.raises(ConfigError, match="auto, chatml, internlm2, llama3, phi3.*Did you mean 'llama3'"):
        get_template("lama3", tok)
    assert add_template_tokens("llama3", tok) == 3 and missing_special_tokens("llama3", tok) == []
    conv = CONVERSATIONS[0]
    ids, labels = get_template("llama3", tok).encode(conv)
    assert tok.convert_tokens_to_ids("<|eot_id|>") in ids


# google/gemma-2b-it: renames assistant to "model", trims content, rejects system turns.
GEMMA_JINJA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
    "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == "
    "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' "
    "+ role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}"
)


def test_auto_with_an_unknown_template_finds_content_and_terminator(h):
    from mmtune.errors import DataError

    tok = h.make_tokenizer(GEMMA_JINJA, specials=["<|endoftext|>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>"])
    t = get_template("auto", tok)
    for conv in CONVERSATIONS[::2]:  # no system turn
        ids, labels = t.encode(conv)
        assert ids == tok.apply_chat_template(conv, tokenize=True)["input_ids"]
        expected = [tok(c.strip() + "<end_of_turn>", add_special_tokens=False)["input_ids"] for c in _assistant(conv)]
        assert h.supervised_runs(ids, labels) == expected
        prompt = t.prompt_ids(conv[:-1])
        assert ids[: len(prompt)] == prompt
    assert t.stop_token_ids == [tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id]
    with pytest.raises(DataError, match="System role not supported") as e:
        t.encode(CONVERSATIONS[1])
    assert e.value.reason == "template_error"


def test_fast_span_tokenization_equals_the_per_token_reference(chatml_tokenizer):
    """tokenize_spans' vectorised fast path (the Rust tokenizer, searchsorted over the spans) gives
    the ids of ``tokenizer(text)`` and, per token, whether it overlaps a span, as the per-token rule."""
    import random

    from mmtune.data.templates import tokenize_spans

    rng = random.Random(0)
    words = ["red", "cat", " sun", "<|im_end|>", "\n", "19.", "héllo", "  ", "<|im_start|>assistant\n"]
    for _ in range(60):
        text = "".join(rng.choice(words) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, 2 * rng.randint(0, 3))))
        spans = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts) - 1, 2)]
        ids, mask = tokenize_spans(chatml_tokenizer, text, spans)
        enc = chatml_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == list(enc["input_ids"])
        want = [any(a < b2 and max(b, a + 1) > a2 for a2, b2 in spans) for a, b in enc["offset_mapping"]]
        assert mask == want, (text, spans)


def test_common_prefix_length():
    import os
    import random

    from mmtune.data.templates import _common_prefix

    rng = random.Random(1)
    for _ in range(300):
        a = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        b = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        assert _common_prefix(a, b) == len(os.path.commonprefix([a, b]))
