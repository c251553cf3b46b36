"""``builtin:tiny-pretrained``: the tiny model after the demo's continued-pretraining stage.

Built once by running that stage's recipe (:func:`mmtune.demo.stage_recipe`) through the one
runner and exporting its final weights, in a temporary directory renamed into place
(:func:`mmtune.util.cached_build`). It lives here, above the training code, and registers
itself in :data:`mmtune.registry.BUILTIN_MODELS`, so that the model loader finds it by name
without importing the training stack.
"""

from __future__ import annotations

from pathlib import Path

from .demo import stage_recipe
from .export import export_checkpoint
from .models import tiny
from .registry import BUILTIN_MODELS
from .util import cached_build, default_cache_root
from .workflows.run import run_recipe


@BUILTIN_MODELS.register("tiny-pretrained")
def build_tiny_pretrained(cache_root: str | Path | None = None, log=print) -> Path:
    """See :func:`mmtune.models.tiny.ensure_tiny_pretrained`."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    steps = tiny.PRETRAIN_STEPS

    def build(tmp: Path) -> Path:
        log(f"building builtin:tiny-pretrained once ({steps} steps of continued pretraining)")
        recipe = stage_recipe("pretrain", str(tiny.ensure_tiny(root)), tmp / "run", train={"max_steps": steps})
        run_recipe(recipe, overwrite=True, log=lambda *a, **k: None)
        return export_checkpoint(tmp / "run" / "final", tmp / "model")

    return cached_build(root / "builtin-tiny-pretrained", tiny.PRETRAINED_INFO,
                        {"tiny_version": tiny.TINY_VERSION, "steps": steps}, build)
