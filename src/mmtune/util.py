"""Small helpers with no mmtune dependencies: where built artefacts are cached, and how a directory
is written atomically (build in a temporary sibling, then rename into place)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def default_cache_root() -> Path:
    """``$MMTUNE_CACHE`` if set, else ``.cache/mmtune`` under the working directory."""
    return Path(os.environ.get("MMTUNE_CACHE") or Path.cwd() / ".cache" / "mmtune")


def has_build_info(path: Path, info_file: str, info: dict) -> bool:
    try:
        return json.loads((path / info_file).read_text()) == info and (path / "config.json").is_file()
    except (OSError, ValueError):
        return False


def cached_build(target: Path, info_file: str, info: dict, build) -> Path:
    """``target`` if its ``info_file`` holds ``info``; else ``build(tmp)`` writes the model into a
    temporary sibling directory (or returns the directory inside it that holds the model), which
    gets ``info_file`` and is renamed into place, so a crash or a concurrent process never leaves
    (or sees) a half-written model."""
    if has_build_info(target, info_file, info):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        built = build(tmp) or tmp
        (built / info_file).write_text(json.dumps(info) + "\n")
        built.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        if target.exists():  # stale: move it aside, then swap the fresh build in
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
            os.replace(target, old / "model")
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(built, target)
        except OSError:
            if not has_build_info(target, info_file, info):  # not a concurrent build that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
