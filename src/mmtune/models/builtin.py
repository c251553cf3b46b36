"""The built-in causal LMs the models layer builds itself, registered by name for
:func:`mmtune.models.loading.resolve_model_path` (``builtin:NAME``): ``tiny`` (made in code,
:mod:`mmtune.models.tiny`) and ``smollm2-135m-instruct`` (converted from a GGUF file,
:mod:`mmtune.models.gguf`). ``tiny-pretrained`` needs a training run and registers itself in
:mod:`mmtune.pretrained`."""

from __future__ import annotations

from ..registry import BUILTIN_MODELS
from .gguf import ensure_smollm2
from .tiny import ensure_tiny

BUILTIN_MODELS.register("tiny")(ensure_tiny)
BUILTIN_MODELS.register("smollm2-135m-instruct")(ensure_smollm2)
