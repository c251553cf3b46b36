"""Models: the built-in tiny model, loading local checkpoints, adapters and freezing."""

from .adapters import apply_adapter, apply_freeze, lora_config, trainable_parameters, trainable_summary
from .loading import load_model, load_tokenizer, resolve_dtype, resolve_model_path
from .tiny import build_tiny, ensure_tiny

__all__ = [
    "apply_adapter", "apply_freeze", "build_tiny", "ensure_tiny", "load_model", "load_tokenizer", "lora_config",
    "resolve_dtype", "resolve_model_path", "trainable_parameters", "trainable_summary",
]
