"""The built-in tiny model (``model.path: builtin:tiny``), built in code with no download.

A byte-level BPE tokenizer trained on the built-in corpus and instruction tasks
(:mod:`mmtune.data.builtin`) and a small randomly initialised Llama-style decoder. It exists
so that every recipe, test and tutorial runs offline on a laptop CPU: LoRA or full SFT on the
built-in tasks learns in minutes on two cores.

Sizes (see :func:`tiny_config`) are chosen for CPU speed and for bitsandbytes: every linear
layer's out-features is a multiple of 32, which the bitsandbytes 4-bit CPU kernels need for
the eval-mode forward, so QLoRA recipes run on the tiny model too.

The directory is a standard Hugging Face checkpoint (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` with a ChatML ``chat_template``): any code that
loads ``AutoModelForCausalLM`` / ``AutoTokenizer`` from a local directory loads it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import util
from ..data import builtin
from ..registry import BUILTIN_MODELS

#: Bumped whenever the tokenizer data, the sizes or the init change, so that an old cache is
#: rebuilt instead of silently reused.
TINY_VERSION = 2  # 2: embedding init std hidden**-0.5 (see init_tiny_model)
#: Tokenizer (and embedding) size. The built-in texts saturate byte-level BPE at ~870
#: tokens; the rest is filled with reserved special tokens (as Llama 3 does with
#: ``<|reserved_special_token_N|>``) so that the size is a multiple of 64 and stays fixed.
TINY_VOCAB = 1024
EOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START, IM_END)
BUILD_INFO = "mmtune_tiny.json"

#: ChatML (the Qwen / OpenAI format): ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message,
#: ``<|im_start|>assistant\n`` as the generation prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokenizer_texts() -> list[str]:
    """The texts the tokenizer is trained on: the pretraining corpus, every instruction task
    question and answer (train and held-out), and the ChatML role lines around them."""
    texts = list(builtin.corpus())
    for split, n in (("train", 400), ("eval", 60)):
        for rec in builtin.instruction_mix(split, n):
            texts += [rec["instruction"], rec["output"], f"user\n{rec['instruction']}",
                      f"assistant\n{rec['output']}"]
    texts += ["system\nYou are a helpful assistant."]
    return texts


def train_tiny_tokenizer(vocab_size: int = TINY_VOCAB):
    """Train the byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    Byte-level (GPT-2 style) so that any input text, not only the built-in vocabulary, can be
    encoded and decoded losslessly. Deterministic: the same texts give the same merges.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_texts(), trainer)
    n_reserved = vocab_size - tok.get_vocab_size()
    reserved = [f"<|reserved_{i}|>" for i in range(n_reserved)]
    if reserved:
        tok.add_special_tokens(reserved)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tiny tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        extra_special_tokens=[IM_START, IM_END], chat_template=CHATML_TEMPLATE, model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def tiny_config(vocab_size: int = TINY_VOCAB, eos_token_id: int = 0):
    """A ``LlamaConfig`` of 1.12M parameters (1,115,264 at vocab 1024).

    hidden 128, 4 layers, 4 query heads and 2 key/value heads (grouped-query attention, head
    dim 32), SwiGLU intermediate 512 (4x), RoPE theta 10k, tied input/output embeddings, 1024
    positions. Every linear out-feature (128, 64, 512, 1024) is a multiple of 32.
    """
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True, initializer_range=0.02, hidden_act="silu",
        attention_bias=False, mlp_bias=False, bos_token_id=eos_token_id, eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )


def init_tiny_model(config, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM``, seeded with a private generator state so the
    global RNG is left as it was.

    Linear layers keep transformers' init (normal, std ``initializer_range`` = 0.02). The tied
    embedding is drawn with std ``hidden_size ** -0.5`` instead (rows of norm ~1). With a tied
    head the logits are ``RMSNorm(h) . e``, whose size is capped by ``sqrt(hidden) * |e|``; at
    std 0.02 that cap is ~2.6, no output can be confident (loss floor ~4.3 nats over 1024
    tokens) and LoRA, which cannot touch the embedding, plateaus at loss ~5.5 on the built-in
    tasks. Unit-norm rows lift the cap to ~11 (random logits have std ~1 at init).
    """
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, config.hidden_size ** -0.5)
    return model.float().eval()


def build_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the tiny tokenizer + model and ``save_pretrained`` both into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tiny_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    model = init_tiny_model(tiny_config(len(tokenizer), eos_id), seed)
    # Chat replies end with <|im_end|>, documents with <|endoftext|>: stop on either (as Qwen2 does).
    model.generation_config.eos_token_id = [eos_id, tokenizer.convert_tokens_to_ids(IM_END)]
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# The cache root and the atomic build live in mmtune.util (one helper for every built artefact);
# the names stay importable from here.
default_cache_root = util.default_cache_root
cached_build = _cached_build = util.cached_build


def ensure_tiny(cache_root: str | Path | None = None, seed: int = 0) -> Path:
    """Return ``<cache_root>/builtin-tiny``, building it first if missing or stale (atomically)."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    return _cached_build(root / "builtin-tiny", BUILD_INFO, {"version": TINY_VERSION, "seed": seed},
                         lambda tmp: build_tiny(tmp, seed))


#: Steps of the continued-pretraining stage behind ``builtin:tiny-pretrained`` (the demo's stage 2).
PRETRAIN_STEPS = 300
PRETRAINED_INFO = "mmtune_tiny_pretrained.json"


def ensure_tiny_pretrained(cache_root: str | Path | None = None, log=print) -> Path:
    """Return ``<cache_root>/builtin-tiny-pretrained``: the tiny model after the demo's
    continued-pretraining stage (full weights, :data:`PRETRAIN_STEPS` steps on the built-in
    corpus and the training questions as plain text), built once (about 1.5 min on 2 cores).

    A base model that has read the built-in facts but never seen the chat format: the starting
    point of the shipped ``dpo`` recipe. Building it runs a training recipe, which sits above the
    models layer, so the builder is :func:`mmtune.pretrained.build_tiny_pretrained`, found through
    :data:`mmtune.registry.BUILTIN_MODELS` (a lazy entry: nothing is imported until it is needed).
    """

    return BUILTIN_MODELS.get("tiny-pretrained")(cache_root, log=log)
