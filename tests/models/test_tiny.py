"""The built-in tiny model: builds offline, reloads with the Auto classes, is deterministic."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmtune.models import tiny
from mmtune.models.tiny import build_tiny, ensure_tiny, init_tiny_model, tiny_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _batch(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


def test_reload_with_auto_classes_gives_identical_logits(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    fresh = init_tiny_model(tiny_config(len(tok), tok.eos_token_id), seed=0)
    x = _batch(len(tok))
    with torch.no_grad():
        a, b = fresh(input_ids=x).logits, reloaded(input_ids=x).logits
    assert a.shape == (2, 24, tiny.TINY_VOCAB)
    assert torch.equal(a, b)
    assert type(reloaded).__name__ == "LlamaForCausalLM"


def test_tokenizer_specials_chat_template_and_roundtrip(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert len(tok) == tiny.TINY_VOCAB
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    ids = {t: tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    assert sorted(ids.values()) == [0, 1, 2]
    # special tokens are single tokens, not split into bytes
    assert tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)[0] == ids["<|im_start|>"]
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "What is 7 + 12?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 7 + 12?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # trained merges: the built-in vocabulary is mostly whole-word tokens
    assert len(tok.tokenize("The capital of Peru is Lima.")) <= 8
    for s in ("Reverse the words: red cat sun", "héllo wörld 😀 tabs\tand\nnewlines", "  two  spaces"):
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_build_is_deterministic_and_seeded(tmp_path, tiny_dir):
    again = build_tiny(tmp_path / "again", seed=0)
    other = build_tiny(tmp_path / "other", seed=1)
    assert (again / "tokenizer.json").read_text() == (tiny_dir / "tokenizer.json").read_text()
    a = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again).state_dict()
    c = AutoModelForCausalLM.from_pretrained(other).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])


def test_sizes_parameter_count_and_linear_shapes(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (128, 4, 4, 2)
    assert c.tie_word_embeddings and c.max_position_embeddings == 1024
    h, i, v, kv = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_key_value_heads * c.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q,o + k,v + gate,up,down + 2 RMSNorms
    expected = v * h + c.num_hidden_layers * per_layer + h  # tied head adds no parameters
    assert sum(p.numel() for p in model.parameters()) == expected == 1_115_264
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4 * 7 + 1
    assert all(m.out_features % 32 == 0 for m in linears)
    assert model.generation_config.eos_token_id == [0, 2]


def test_ensure_tiny_builds_once_into_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMTUNE_CACHE", str(tmp_path / "cache"))
    path = ensure_tiny()
    assert path == tmp_path / "cache" / "builtin-tiny"
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    # no temporary directories are left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["builtin-tiny"]
    # a build from an older mmtune is replaced
    (path / tiny.BUILD_INFO).write_text(json.dumps({"version": -1, "seed": 0}))
    assert ensure_tiny() == path
    assert json.loads((path / tiny.BUILD_INFO).read_text())["version"] == tiny.TINY_VERSION
    assert sorted(p.name for p in path.parent.iterdir()) == ["builtin-tiny"]
    # an explicit cache root wins over the environment
    assert ensure_tiny(tmp_path / "elsewhere") == tmp_path / "elsewhere" / "builtin-tiny"


def test_lora_fits_a_batch_below_the_small_init_logit_cap(tiny_dir):
    """LoRA cannot change the tied embedding, so its scale bounds how confident the model can
    get. With transformers' std-0.02 embedding the loss stays above ~4.3 nats; the tiny
    model's unit-norm embedding (std hidden**-0.5) lets LoRA fit a small batch."""
    from mmtune.config import AdapterConfig
    from mmtune.models.adapters import apply_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    emb = model.get_input_embeddings().weight
    assert model.lm_head.weight.data_ptr() == emb.data_ptr()  # tied
    assert abs(emb.std().item() - 128 ** -0.5) < 0.005
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    x = torch.tensor([tok.encode("The capital of Peru is Lima. 3 plus 4 equals 7.")[:11],
                      tok.encode("Reverse the words: red cat sun. sun cat red")[:11]])  # (2, 11)
    torch.manual_seed(0)
    model = apply_adapter(model, AdapterConfig(r=8, alpha=16, dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(30):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 1.0, losses


def test_ensure_tiny_pretrained_trains_once_and_differs_from_the_random_init(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(tiny, "PRETRAIN_STEPS", 3)  # the real build runs 300 steps (~1.5 min)
    root = tmp_path / "cache"
    path = tiny.ensure_tiny_pretrained(root, log=lambda *a: None)
    assert path == root / "builtin-tiny-pretrained"
    assert json.loads((path / tiny.PRETRAINED_INFO).read_text())["steps"] == 3
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no temporary dirs left
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert tiny.ensure_tiny_pretrained(root, log=lambda *a: None) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not retrained
    base = AutoModelForCausalLM.from_pretrained(root / "builtin-tiny")
    trained = AutoModelForCausalLM.from_pretrained(path)
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, trained.model.layers[0].mlp.up_proj.weight)
