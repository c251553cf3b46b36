"""GGUF out: write a merged Llama / Qwen2-family Hugging Face model as one ``.gguf`` file that
llama.cpp, Ollama and transformers' GGUF reader load.

Follows llama.cpp's ``convert_hf_to_gguf.py`` (``TextModel.set_gguf_parameters``,
``LlamaModel.modify_tensors``, ``_set_vocab_gpt2``), written with the ``gguf`` package that
llama.cpp ships (``GGUFWriter``, ``get_tensor_name_map`` for the tensor names, ``quants`` for
Q8_0):

- **Q/K permutation (llama only).** HF Llama applies RoPE to the two halves of each head
  (``rotate_half``); llama.cpp's ``llama`` graph rotates interleaved pairs. The converter
  reorders the rows of ``q_proj`` / ``k_proj`` (weights and biases) per head so the two agree
  (``LlamaModel.permute``); transformers' reader undoes it (``LlamaTensorProcessor``). Qwen2's
  graph uses NEOX-style RoPE, which is HF's, so it is written as is.
- **Tied embeddings.** No ``output.weight`` when ``tie_word_embeddings``; llama.cpp then uses
  ``token_embd.weight`` for the output, and transformers' reader sets ``tie_word_embeddings``
  from the missing tensor.
- **Types.** ``f32``: every tensor F32. ``f16`` / ``q8_0``: 2-D weights in F16 / Q8_0, 1-D
  tensors (norms, biases) in F32, as llama.cpp does (``MOSTLY_F16``: "except 1d tensors"); a
  matrix whose rows are not a multiple of Q8_0's 32-value block falls back to F16, as llama.cpp's
  converter does.
- **Tokenizer.** Byte-level BPE (``tokenizer.ggml.model = gpt2``): the tokens in their byte-level
  spelling, padded to the model's vocabulary with ``[PAD{i}]`` UNUSED entries, the token types
  (CONTROL for special added tokens, USER_DEFINED for other added tokens), the merges and the
  special token ids (``gguf.SpecialVocab``), ``add_bos`` / ``add_eos`` as the tokenizer
  actually behaves, and the chat template. ``tokenizer.ggml.pre`` names llama.cpp's
  pre-tokenizer; llama.cpp identifies it by hashing a test encoding (``get_vocab_base_pre``), we
  read it off the tokenizer's own pre-tokenizer (:data:`PRE_TOKENIZERS`).

Not covered (refused with a one-line error): other architectures, RoPE scaling (``rope_type``
other than ``default``: llama.cpp needs extra tensors/keys for Llama-3.1-style scaling), sliding
window attention, and non-BPE (sentencepiece) tokenizers.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import MMTuneError
from .export import find_checkpoint
from .models.loading import resolve_model_path, set_offline

log = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")
#: HF ``model_type`` -> (gguf MODEL_ARCH member, whether Q/K rows are permuted for llama.cpp's RoPE).
ARCHITECTURES = {"llama": ("LLAMA", True), "qwen2": ("QWEN2", False)}
#: Q8_0 quantises blocks of this many values along a row (gguf ``GGML_QUANT_SIZES``).
Q8_0_BLOCK = 32

_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
#: llama.cpp pre-tokenizer name -> the HF pre-tokenizer that splits text the same way
#: (llama.cpp ``llama-vocab.cpp``: ``gpt-2`` is GPT-2's regex, ``smollm`` splits every digit and
#: then applies it, ``qwen2`` / ``llama-bpe`` are the Qwen2 and Llama-3 split regexes).
PRE_TOKENIZERS = {
    "gpt-2": ("ByteLevel(use_regex=True)",),
    "smollm": ("Digits(individual_digits=True)", "ByteLevel(use_regex=True)"),
    "qwen2": (f"Split({_QWEN2_REGEX})", "ByteLevel(use_regex=False)"),
    "llama-bpe": (f"Split({_LLAMA3_REGEX})", "ByteLevel(use_regex=False)"),
}


def _describe_pre_tokenizer(pre: dict | None) -> tuple[str, ...]:
    """A HF pre-tokenizer (its JSON form) as the tuple of steps :data:`PRE_TOKENIZERS` lists."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(step for p in pre["pretokenizers"] for step in _describe_pre_tokenizer(p))
    if kind == "ByteLevel":
        return (f"ByteLevel(use_regex={pre.get('use_regex', True)})",)
    if kind == "Digits":
        return (f"Digits(individual_digits={pre.get('individual_digits', False)})",)
    if kind == "Split":
        pattern = pre.get("pattern", {})
        return (f"Split({pattern.get('Regex', pattern.get('String'))})",)
    return (kind or "?",)


def tokenizer_pre(tokenizer) -> str:
    """The llama.cpp ``tokenizer.ggml.pre`` name for a byte-level BPE ``tokenizer``."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE" or spec["model"].get("byte_fallback"):
        raise MMTuneError(f"tokenizer model {spec['model']['type']} (byte_fallback="
                          f"{spec['model'].get('byte_fallback')}): export-gguf writes byte-level BPE tokenizers only")
    steps = _describe_pre_tokenizer(spec.get("pre_tokenizer"))
    for name, expected in PRE_TOKENIZERS.items():
        if steps == expected:
            return name
    raise MMTuneError(f"tokenizer pre-tokenizer {' + '.join(steps) or 'none'} matches none llama.cpp knows that "
                      f"export-gguf writes ({', '.join(PRE_TOKENIZERS)}): not a byte-level BPE tokenizer of the "
                      "GPT-2 / SmolLM / Qwen2 / Llama-3 kind")


def permute_qk(weight, n_head: int):
    """llama.cpp's ``LlamaModel.permute``: per head, reorder the rows of a Q or K projection
    (or its bias) from HF's half-split RoPE layout to the interleaved pairs llama.cpp rotates."""
    rows = weight.shape[0]
    # (n_head, 2, head_dim/2, ...) -> (n_head, head_dim/2, 2, ...) -> (rows, ...)
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _check_config(config, src: Path) -> tuple[str, bool]:
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise MMTuneError(f"{src}: model_type '{model_type}' cannot be exported to GGUF; supported: "
                          f"{', '.join(ARCHITECTURES)}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise MMTuneError(f"{src}: RoPE scaling '{rope.get('rope_type')}' is not supported by export-gguf "
                          "(only rope_type default)")
    if getattr(config, "use_sliding_window", False):
        raise MMTuneError(f"{src}: sliding-window attention is not supported by export-gguf")
    return ARCHITECTURES[model_type]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _vocab(tokenizer, vocab_size: int):
    """(tokens in the vocabulary's own spelling, gguf token types), one entry per embedding row."""
    from gguf import TokenType

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise MMTuneError(f"tokenizer has token id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            # llama.cpp matches added tokens in the raw text, so they are written as typed.
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    return tokens, types


def _adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether encoding with special tokens prepends BOS / appends EOS (read off the behaviour,
    which covers both post-processors and ``add_bos_token`` flags)."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    start = full.index(plain[0]) if plain and plain[0] in full else 0
    bos = start > 0 and tokenizer.bos_token_id is not None and full[start - 1] == tokenizer.bos_token_id
    eos = (len(full) > start + len(plain) and tokenizer.eos_token_id is not None
           and full[-1] == tokenizer.eos_token_id)
    return bos, eos


def _write_tokenizer(writer, tokenizer, model_dir: Path, vocab_size: int) -> None:
    import gguf

    pre = tokenizer_pre(tokenizer)
    tokens, types = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise MMTuneError(f"{model_dir / 'tokenizer.json'}: no BPE merges found")
    special.add_special_token = {}  # written below from the tokenizer's behaviour
    special.chat_template = None  # written below from the loaded tokenizer
    for typ in ("bos", "eos", "pad", "unk"):  # the loaded tokenizer's ids win over config.json's
        token_id = getattr(tokenizer, f"{typ}_token_id", None)
        if token_id is not None:
            special.special_token_ids[typ] = token_id
    if "bos" not in special.special_token_ids and "eos" in special.special_token_ids:
        special.special_token_ids["bos"] = special.special_token_ids["eos"]  # llama.cpp needs one; never added
    special.add_to_gguf(writer, quiet=True)
    add_bos, add_eos = _adds_special(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _tensor_type(array, out_type: str):
    from gguf import GGMLQuantizationType as Q

    if out_type == "f32" or array.ndim == 1:
        return Q.F32
    if out_type == "q8_0" and array.shape[-1] % Q8_0_BLOCK == 0:
        return Q.Q8_0
    return Q.F16


def export_gguf(model_dir: str | Path, out_file: str | Path, out_type: str = "f16",
                log_fn: Callable[[str], None] = log.info) -> Path:
    """Write the HF model directory ``model_dir`` (a merged Llama / Qwen2-family model, or a
    ``builtin:`` name) as the GGUF file ``out_file`` with weights in ``out_type``
    (:data:`GGUF_TYPES`). The file is written to a temporary sibling and renamed into place."""
    import gguf
    import torch
    from gguf import quants
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if out_type not in GGUF_TYPES:
        raise MMTuneError(f"GGUF type '{out_type}': valid: {', '.join(GGUF_TYPES)}")
    set_offline()

    if not (Path(str(model_dir)) / "config.json").is_file() and find_checkpoint(model_dir) is not None:
        raise MMTuneError(f"'{model_dir}' is a training checkpoint: write a full model first with "
                          f"`mmtune merge {model_dir} OUT_DIR`, then `mmtune export-gguf OUT_DIR {out_file}`")
    src = resolve_model_path(model_dir)
    config = AutoConfig.from_pretrained(src, local_files_only=True)
    arch_name, permute = _check_config(config, src)
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, local_files_only=True)
    state = model.state_dict()
    arch = gguf.MODEL_ARCH[arch_name]
    n_layers, n_head, n_kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    log_fn(f"export-gguf: {src} ({config.model_type}, {n_layers} layers, {sum(p.numel() for p in model.parameters()):,} "
           f"parameters, tied embeddings {tied}) -> {out_file} ({out_type})")

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}-", suffix=".tmp", dir=out.parent)
    os.close(fd)
    writer = gguf.GGUFWriter(tmp_name, gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_name(getattr(config, "_name_or_path", "") and Path(config._name_or_path).name or src.name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_block_count(n_layers)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(config.vocab_size)
        head_dim = _head_dim(config)
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type])
        _write_tokenizer(writer, tokenizer, src, config.vocab_size)

        names = gguf.get_tensor_name_map(arch, n_layers)
        counts: dict[str, int] = {}
        for hf_name, tensor in state.items():
            if tied and hf_name == "lm_head.weight":
                continue
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise MMTuneError(f"{src}: tensor '{hf_name}' has no GGUF name for architecture {arch_name.lower()}")
            data = tensor.detach().float()
            if permute and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_qk(data, n_head)
            elif permute and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_qk(data, n_kv)
            array = data.numpy()
            qtype = _tensor_type(array, out_type)
            writer.add_tensor(name, quants.quantize(array, qtype), raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        del model, state
        log_fn(f"export-gguf: {sum(counts.values())} tensors ({', '.join(f'{n} {k}' for k, n in sorted(counts.items()))}), "
               f"vocabulary {config.vocab_size}, chat template {'yes' if tokenizer.chat_template else 'no'}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, out)
    except BaseException:
        writer.close()
        Path(tmp_name).unlink(missing_ok=True)
        raise
    log_fn(f"export-gguf: wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return out
