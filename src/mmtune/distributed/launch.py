"""Launch: ``mmtune train RECIPE --nproc N`` re-executes itself under ``torch.distributed.run``
(:func:`launch`); a failing rank's error comes back as one line (:func:`report_error` writes
it into torchrun's per-rank error file, :func:`first_failure` reads the earliest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ConfigError, MMTuneError


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (the children must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def launch(nproc: int, argv: list[str], *, module: str = "mmtune.cli", env: dict | None = None) -> int:
    """Run ``python -m {module} {argv}`` in ``nproc`` processes under ``torch.distributed.run``
    on this machine and wait for them.

    Every rank prints to this terminal. When a rank fails, torchrun stops the others and this
    raises :class:`MMTuneError` with the failing rank's error (read from the error file torchrun
    gives each rank, see :func:`report_error`). Returns 0 on success.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {nproc})")
    argv = strip_nproc(list(argv))
    with tempfile.TemporaryDirectory(prefix="mmtune-launch-") as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--max_restarts=0", f"--log-dir={logs}", "-m", module, *argv]
        run_env = {**os.environ, **(env or {})}
        # One CPU thread per rank unless the user chose (torchrun's own default, without its warning).
        run_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        rc = subprocess.call(cmd, env=run_env)
        if rc == 0:
            return 0
        failure = first_failure(Path(logs))
    if failure is None:
        raise MMTuneError(f"{nproc}-process run failed (exit code {rc}); the failing rank's output is above")
    rank, message = failure
    raise MMTuneError(f"rank {rank} of {nproc} failed: {message}")


def first_failure(log_dir: Path) -> tuple[int, str] | None:
    """The earliest error any rank recorded under torchrun's ``--log-dir``: (rank, message)."""
    found = []
    for f in Path(log_dir).rglob("error.json"):
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        msg = data.get("message", {})
        if isinstance(msg, dict):
            text = msg.get("message", "")
            ts = int(msg.get("extraInfo", {}).get("timestamp", 0) or 0)
        else:
            text, ts = str(msg), 0
        try:
            rank = int(f.parent.name)
        except ValueError:
            rank = -1
        found.append((ts, rank, text.strip().splitlines()[-1] if text.strip() else "(no message)"))
    if not found:
        return None
    _, rank, text = min(found)
    return rank, text


def report_error(exc: BaseException) -> None:
    """Record ``exc`` as this rank's error for :func:`launch` (torchrun's per-rank error file).

    Call it where the CLI turns an exception into its one-line message. No-op outside torchrun.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import time
    import traceback

    text = str(exc) if isinstance(exc, MMTuneError) else f"{type(exc).__name__}: {exc}"
    data = {"message": {"message": text, "extraInfo": {
        "py_callstack": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        "timestamp": str(int(time.time()))}}}
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data))
    except OSError:
        pass
