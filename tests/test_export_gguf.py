"""GGUF export (mmtune.export_gguf) and import (mmtune.models.gguf) round trips on tiny random
Llama and Qwen2 models, checked against transformers' own GGUF reader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quants
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from mmtune.cli import main
from mmtune.errors import MMTuneError
from mmtune.export_gguf import export_gguf, permute_qk, tokenizer_pre
from mmtune.models.gguf import gguf_architecture, import_gguf, supported_architectures
from mmtune.models.tiny import ensure_tiny

TEXTS = ["What is 7 + 12?", "  two  spaces\nand a newline", "<|im_start|>user\nhi<|im_end|>", "Ünïcödé 2024-01-31 ✓"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "7"}]


def _random_model(tmp_path, kind: str):
    """A tiny random model with the built-in byte-level BPE tokenizer. Llama: untied embeddings
    and head_dim != hidden/heads; Qwen2: q/k/v biases and tied embeddings. Norm weights and
    biases are random too, so a misplaced one shows in the logits."""
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny())
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-6)
    if kind == "llama":
        config = LlamaConfig(**common, head_dim=32, tie_word_embeddings=False, rope_theta=50000.0)
    else:
        config = Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    out = tmp_path / kind
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out, model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    return _random_model(tmp_path_factory.mktemp("m"), request.param)


def _ids() -> torch.Tensor:
    return torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _load_gguf(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _rounded(model, out_type: str):
    """``model`` with every 2-D weight rounded as the GGUF type stores it (F16, or Q8_0 quantised
    and dequantised by the gguf package), 1-D tensors kept in F32: what the file holds."""
    clone = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32).eval()
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in clone.parameters():
            if p.ndim == 2:
                w = p.numpy()
                if out_type == "f16":
                    p.copy_(torch.from_numpy(w.astype(np.float16).astype(np.float32)))
                else:
                    q = GGMLQuantizationType.Q8_0
                    p.copy_(torch.from_numpy(quants.dequantize(quants.quantize(w, q), q).reshape(w.shape)))
    return clone


def test_f32_round_trip_is_exact(tiny, tmp_path):
    """F32: the reader gives back the same logits bit for bit, so the names, the Q/K permutation,
    tied/untied output, the biases and the hyperparameters all survive."""
    src, model = tiny
    path = export_gguf(src, tmp_path / "m.gguf", "f32", log_fn=lambda s: None)
    loaded = _load_gguf(path)
    assert type(loaded) is type(model)
    assert loaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert loaded.config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert (_logits(loaded) - _logits(model)).abs().max().item() == 0.0
    names = {t.name for t in GGUFReader(str(path)).tensors}
    assert ("output.weight" in names) == (not model.config.tie_word_embeddings)


@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_f16_and_q8_0_equal_the_rounded_weights(tiny, tmp_path, out_type):
    """The file's logits equal the model whose weights are rounded exactly as the type stores them
    (measured max abs diff 0.0; 1e-5 allowed for summation order): the storage rounding is the
    only difference from the fp32 model. Against the fp32 model the difference relative to max
    |logit| follows from the per-weight rounding (F16: 11-bit mantissa, <= 2^-11 relative; Q8_0:
    steps of 1/127 of each 32-value block's absmax): measured F16 3.7e-4 (llama) / 3.1e-4 (qwen2),
    Q8_0 1.03e-2 / 6.8e-3 on these random models (small logits, max ~0.7, so the relative figure is
    pessimistic; builtin:tiny: 1.3e-4 / 3.5e-3). Asserted at ~5x the worst measured value."""
    src, model = tiny
    path = export_gguf(src, tmp_path / "m.gguf", out_type, log_fn=lambda s: None)
    types = {t.tensor_type for t in GGUFReader(str(path)).tensors}
    stored = GGMLQuantizationType.F16 if out_type == "f16" else GGMLQuantizationType.Q8_0
    assert types == {GGMLQuantizationType.F32, stored}
    got = _logits(_load_gguf(path))
    assert (got - _logits(_rounded(model, out_type))).abs().max().item() <= 1e-5
    scale = _logits(model).abs().max().item()
    rel = (got - _logits(model)).abs().max().item() / scale
    assert 0 < rel <= {"f16": 2.5e-3, "q8_0": 5e-2}[out_type]


def test_tokenizer_and_chat_template_round_trip(tiny, tmp_path):
    src, model = tiny
    path = export_gguf(src, tmp_path / "m.gguf", "f16", log_fn=lambda s: None)
    ref = AutoTokenizer.from_pretrained(src)
    got = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert got.encode(text) == ref.encode(text), text
    assert got.chat_template == ref.chat_template
    assert (got.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
            == ref.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True))
    fields = GGUFReader(str(path)).fields
    # transformers loads the byte-level tokenizer as Qwen2Tokenizer (Qwen2's split regex) for a qwen2 model
    assert fields["tokenizer.ggml.pre"].contents() == {"llama": "gpt-2", "qwen2": "qwen2"}[model.config.model_type]
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["tokenizer.ggml.eos_token_id"].contents() == ref.eos_token_id


def test_import_gguf_gives_a_plain_hf_dir_with_the_same_logits(tiny, tmp_path):
    src, model = tiny
    path = export_gguf(src, tmp_path / "m.gguf", "f32", log_fn=lambda s: None)
    lines = []
    out = import_gguf(path, tmp_path / "imported", log_fn=lines.append)
    assert len(lines) == 2 and "import-gguf" in lines[0]
    assert not (out / "config.json").read_text().count("quantization_config")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(_logits(reloaded), _logits(model))
    assert AutoTokenizer.from_pretrained(out).encode(TEXTS[0]) == AutoTokenizer.from_pretrained(src).encode(TEXTS[0])


def test_llama_qk_permutation_is_the_one_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(8 * 3, 5)  # 3 heads of dim 8
    permuted = permute_qk(torch.from_numpy(w), 3).numpy()
    assert not np.array_equal(permuted, w)
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(permuted, 3, 3), w)


def test_cli_round_trip_and_one_line_errors(tiny, tmp_path, capsys):
    src, model = tiny
    out = tmp_path / "m.gguf"
    assert main(["export-gguf", str(src), str(out), "--type", "f32"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["import-gguf", str(out), str(tmp_path / "back")]) == 0
    assert "imported to" in capsys.readouterr().out
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()), _logits(model))
    # an occupied output directory is refused, a bad input is one line
    assert main(["import-gguf", str(out), str(tmp_path / "back")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a gguf file")
    for argv, needle in ((["import-gguf", str(bad), str(tmp_path / "x")], "cannot read as GGUF"),
                         (["import-gguf", str(tmp_path / "nope.gguf"), str(tmp_path / "x")], "does not exist"),
                         (["export-gguf", str(tmp_path / "nodir"), str(tmp_path / "y.gguf")], "does not exist")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.gguf").exists()


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    path = tmp_path / "rwkv.gguf"
    writer = GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_architecture(path) == "rwkv6"
    assert "llama" in supported_architectures() and "qwen2moe" in supported_architectures()
    assert "tokenizer" not in supported_architectures()
    with pytest.raises(MMTuneError, match=r"architecture 'rwkv6' is not one transformers reads; supported: .*llama"):
        import_gguf(path, tmp_path / "out")


def test_export_refuses_what_it_cannot_write(tmp_path):
    src, _ = _random_model(tmp_path, "llama")
    config = (src / "config.json").read_text()
    (src / "config.json").write_text(config.replace('"rope_type": "default"', '"rope_type": "linear", "factor": 2.0'))
    with pytest.raises(MMTuneError, match="RoPE scaling 'linear'"):
        export_gguf(src, tmp_path / "a.gguf", "f16")
    (src / "config.json").write_text(config.replace('"model_type": "llama"', '"model_type": "gpt2"'))
    with pytest.raises(MMTuneError, match="model_type 'gpt2' cannot be exported to GGUF; supported: llama, qwen2"):
        export_gguf(src, tmp_path / "a.gguf", "f16")
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "meta.json").write_text('{"adapter": "lora", "base_model": "x"}')
    with pytest.raises(MMTuneError, match="is a training checkpoint: .*mmtune merge"):
        export_gguf(tmp_path / "run", tmp_path / "a.gguf", "f16")
    (tmp_path / "run" / "final" / "meta.json").unlink()
    (tmp_path / "run" / "final").rmdir()
    (tmp_path / "run").rmdir()
    with pytest.raises(MMTuneError, match="GGUF type 'q4_0'"):
        export_gguf(src, tmp_path / "a.gguf", "q4_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]  # no temporary file left


def test_pre_tokenizer_names(tmp_path):
    from tokenizers import pre_tokenizers

    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny())
    assert tokenizer_pre(tokenizer) == "gpt-2"
    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert tokenizer_pre(tokenizer) == "smollm"
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(MMTuneError, match="matches none llama.cpp knows"):
        tokenizer_pre(tokenizer)


def _llama_cpp(path, **kw):
    llama_cpp = pytest.importorskip("llama_cpp")  # optional: `pip install llama-cpp-python` (compiles C++)
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False, **kw)


def test_llama_cpp_reads_the_export(tiny, tmp_path):
    """llama.cpp itself: the same token ids as the HF tokenizer (special tokens included) and the
    same logits up to llama.cpp's own kernels (its KV cache is F16): measured 1.5e-4 of max |logit|
    ~0.6 (relative 2.5e-4 / 2.3e-4, llama / qwen2) here, 6.3e-4 of 11.1 on builtin:tiny, 1.8e-2 of 27.4
    (6.5e-4) on SmolLM2-135M."""
    src, model = tiny
    path = export_gguf(src, tmp_path / "m.gguf", "f32", log_fn=lambda s: None)
    llm = _llama_cpp(path, logits_all=True)
    tokenizer = AutoTokenizer.from_pretrained(src)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text), text
    ids = tokenizer.encode(TEXTS[0])
    llm.eval(ids)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = np.array(llm.scores[: len(ids)])
    assert np.abs(got - ref).max() <= 1e-2 * np.abs(ref).max()
    llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("out_type", ["f16", "q8_0"])
def test_smollm2_export_round_trip(tmp_path, out_type):
    """The real SmolLM2-135M-Instruct: exported F16 / Q8_0, read back by transformers, equals the
    model with its weights rounded as stored, and the tokenizer and chat template survive."""
    from mmtune.models.loading import resolve_model_path

    src = resolve_model_path("builtin:smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    path = export_gguf(src, tmp_path / "smol.gguf", out_type, log_fn=lambda s: None)
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. The capital of Italy is")])
    with torch.no_grad():
        got = _load_gguf(path)(input_ids=ids).logits
        rounded = _rounded(model, out_type)(input_ids=ids).logits
        full = model(input_ids=ids).logits
    scale = full.abs().max().item()
    assert (got - rounded).abs().max().item() <= 1e-5 * scale
    assert (got - full).abs().max().item() <= {"f16": 2.5e-3, "q8_0": 5e-2}[out_type] * scale
    back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert back.encode(text) == tokenizer.encode(text)
    assert back.chat_template == tokenizer.chat_template


@pytest.mark.slow
def test_smollm2_greedy_generation_in_llama_cpp_matches_transformers(tmp_path):
    """F32 export in llama.cpp: same prompt ids, same greedy text as transformers ("The capital of
    France is Paris."; F16 answers the same in llama.cpp, while Q8_0 and the packaged Q4_1 file both
    answer "L'Étoile, la Cité, ..." there: llama.cpp's 8-bit activations on this 135M model)."""
    pytest.importorskip("llama_cpp")
    from mmtune.models.loading import resolve_model_path

    src = resolve_model_path("builtin:smollm2-135m-instruct")
    path = export_gguf(src, tmp_path / "smol.gguf", "f32", log_fn=lambda s: None)
    llm = _llama_cpp(path)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
    ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    got = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == len(ref) or token == tokenizer.eos_token_id:
            break
    assert tokenizer.decode(got) == tokenizer.decode(ref)
    assert "Paris" in tokenizer.decode(got)
    # llama.cpp's own chat formatting from the file's template gives the same answer
    reply = llm.create_chat_completion(messages, max_tokens=24, temperature=0.0, top_k=1, repeat_penalty=1.0)
    assert "Paris" in reply["choices"][0]["message"]["content"]
    llm.close()


@pytest.mark.slow
def test_cli_imports_the_packaged_smollm2_q4_1_file(tmp_path, capsys):
    """`mmtune import-gguf` on a real quantized file (Q4_1 + Q8_0 embeddings) gives the same model
    as the built-in conversion."""
    from mmtune.models.gguf import smollm2_gguf_path
    from mmtune.models.loading import resolve_model_path

    assert main(["import-gguf", str(smollm2_gguf_path()), str(tmp_path / "smol")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("import-gguf:") and "llama" in lines[0] and lines[-1].startswith("imported to")
    ids = torch.tensor([[1, 4093, 198, 2]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "smol").eval()(input_ids=ids).logits
        ref = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:smollm2-135m-instruct")).eval()(
            input_ids=ids).logits
    assert torch.equal(got, ref)


def test_a_file_transformers_cannot_convert_is_one_line(tiny, tmp_path):
    """A llama file whose tokenizer model transformers has no builder for (here: ``bert``)."""
    src, _ = tiny
    path = export_gguf(src, tmp_path / "m.gguf", "f32", log_fn=lambda s: None)
    reader = GGUFReader(str(path))
    writer = GGUFWriter(str(tmp_path / "odd.gguf"), gguf_architecture(path))
    for name, field in reader.fields.items():
        if name.startswith(("GGUF.", "general.architecture")):
            continue
        value = "bert" if name == "tokenizer.ggml.model" else field.contents()
        writer.add_key_value(name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MMTuneError, match=r"odd\.gguf: transformers cannot convert this GGUF file \(.*bert"):
        import_gguf(tmp_path / "odd.gguf", tmp_path / "out")
