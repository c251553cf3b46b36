"""Atomic, resumable checkpoints.

Layout of one checkpoint (``OUTPUT/checkpoints/step-00000012/``)::

    model/              model.save_pretrained(): a PEFT adapter dir, a full HF model dir, or
                        model.safetensors for a plain torch module
    tokenizer/          tokenizer.save_pretrained(), when there is a tokenizer
    recipe.yaml         the validated recipe the run used
    trainer_state.pt    optimizer, scheduler, RNG states, data position, counters
    meta.json           {"step", "adapter", "base_model", ...}; written last

A checkpoint is written into ``.tmp-step-*`` and renamed into place only when complete, so
``--resume`` can never pick up a half-written one; older ones beyond ``keep_last`` are pruned.
A process killed during a save leaves its ``.tmp-*`` directory behind (and, killed between the
two renames that replace a checkpoint of the same name, an ``.old-*`` one). The writer records
its pid, host and process start time in ``.tmp-*/writer.json``; :func:`clean_stale_checkpoint_dirs`
(run by the trainer at start-up and on ``--resume``) removes those whose writer is gone and
logs it, and never touches one that a live process is writing.

Sharded runs (FSDP2, DeepSpeed ZeRO-3) write the same layout: every rank takes part in
gathering the full weights (:func:`full_model_state_dict`) and the full optimizer state keyed
by parameter name (:func:`optimizer_state_dict`), rank 0 writes them. Loading re-shards, so a
checkpoint resumes on any number of processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step-(\d+)$")
TMP_RE = re.compile(r"^\.(tmp|old)-(.+)-(\d+)$")  # .tmp-NAME-PID while writing, .old-NAME-PID while replacing
WRITER_FILE = "writer.json"


def _is_hf(model) -> bool:
    return hasattr(model, "save_pretrained")


def save_model(model, out: Path, state_dict: dict | None = None) -> None:
    """``state_dict``: the full weights of a sharded model (:func:`full_model_state_dict`);
    None reads them from ``model``."""
    out.mkdir(parents=True, exist_ok=True)
    if _is_hf(model):
        kwargs = {} if state_dict is None else {"state_dict": state_dict}
        model.save_pretrained(out, safe_serialization=True, **kwargs)
    else:
        state = model.state_dict() if state_dict is None else state_dict
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "model.safetensors"))


# --------------------------------------------------------------------------- sharded models
# FSDP2 parameters are DTensors (each rank holds a shard); DeepSpeed ZeRO-3 parameters are
# empty placeholders with the shard in ``param.ds_tensor``. Saving gathers full tensors,
# loading scatters them back. These helpers are collective: call them on every rank.


def _is_dtensor_sharded(model) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _is_zero3(model) -> bool:
    return any(hasattr(p, "ds_id") and hasattr(p, "ds_tensor") for p in model.parameters())


def is_sharded(model) -> bool:
    """Whether ``model``'s weights are split over the ranks (its forward is then collective)."""
    return _is_dtensor_sharded(model) or _is_zero3(model)


def full_model_state_dict(model) -> dict | None:
    """The full (unsharded) weights of a sharded model, on CPU on rank 0 ({} on the others);
    None when every rank already holds the full weights (save_pretrained reads the model).

    A PEFT model only gathers its trainable tensors (the adapter that save_pretrained writes),
    not the frozen base model.
    """
    only_trainable = hasattr(model, "peft_config")
    if _is_dtensor_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=only_trainable)
        return get_model_state_dict(model, options=opts)
    if _is_zero3(model):
        import deepspeed
        import torch.distributed as dist

        params = [p for p in model.parameters() if p.requires_grad or not only_trainable]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if dist.get_rank() != 0:
                return {}
            keep = {id(p) for p in params}
            named = dict(model.named_parameters())
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                    if k not in named or id(named[k]) in keep}
    return None


def _full_to_local(model):
    """A load_state_dict pre-hook on the root of a DTensor-sharded model: full tensors from a
    checkpoint become DTensors laid out like the parameters they load into (every rank has
    read the whole file, so each keeps its own shard without communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())

    def hook(module, state_dict, prefix, *args):
        for key, value in list(state_dict.items()):
            p = params.get(key[len(prefix):])
            if isinstance(p, DTensor) and torch.is_tensor(value) and not isinstance(value, DTensor):
                value = value.to(device=p.device, dtype=p.dtype)
                state_dict[key] = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)

    return model.register_load_state_dict_pre_hook(hook)


def _loading_into(model):
    """Context for loading full weights into ``model`` whatever its sharding."""
    from contextlib import contextmanager, nullcontext

    if _is_zero3(model):
        import deepspeed

        # Gather, let rank 0's load stand (all ranks read the same file), re-partition on exit.
        return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0)
    if not _is_dtensor_sharded(model):
        return nullcontext()

    @contextmanager
    def hooked():
        handle = _full_to_local(model)
        try:
            yield
        finally:
            handle.remove()

    return hooked()


def optimizer_state_dict(model, optimizer) -> dict:
    """The optimizer state keyed by parameter name, unsharded (on rank 0 under FSDP2), so that
    it loads into any number of processes. Optimizers that gather their own state (the
    DeepSpeed ZeRO wrapper in mmtune.distributed) are asked directly."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state_dict(model, optimizer, state: dict) -> None:
    """Load what :func:`optimizer_state_dict` wrote (re-sharding under FSDP2); older
    checkpoints keyed by parameter index load as they are."""
    if "deepspeed_zero_partitions" in state and isinstance(optimizer, torch.optim.Optimizer):
        from ..errors import MMTuneError

        raise MMTuneError(f"this checkpoint holds DeepSpeed ZeRO optimizer partitions of {state['world_size']} "
                          f"processes; resume it with distributed.strategy=deepspeed and --nproc {state['world_size']}")
    if not isinstance(optimizer, torch.optim.Optimizer) or all(isinstance(k, int) for k in state.get("state", {})):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def load_model_weights(model, src: Path) -> None:
    """Load weights written by :func:`save_model` into an already built ``model``."""
    src = Path(src)
    with _loading_into(model):
        _load_weights(model, src)


def _load_weights(model, src: Path) -> None:
    if (src / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict

        weights = load_file(str(src / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights)
        return
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors) in {src}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied weights (lm_head) are saved once by save_pretrained; everything else must match.
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {src} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and
             (p / "meta.json").is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(output_dir: str | Path, step: int, model, trainer_state: dict, *, tokenizer=None,
                    recipe: dict | None = None, meta: dict | None = None, keep_last: int = 2,
                    name: str | None = None, model_state: dict | None = None) -> Path:
    """Write a complete checkpoint atomically and prune old ones. Returns its directory.

    ``model_state``: full weights gathered from a sharded model (see :func:`save_model`)."""
    root = Path(output_dir) / "checkpoints" if name is None else Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final_name = name or f"step-{step:08d}"
    tmp = root / f".tmp-{final_name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    (tmp / WRITER_FILE).write_text(json.dumps(_writer()))
    save_model(model, tmp / "model", model_state)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "tokenizer")
    if recipe is not None:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    torch.save(trainer_state, tmp / "trainer_state.pt")
    info = {"step": step, **(meta or {})}
    (tmp / "meta.json").write_text(json.dumps(info, indent=1))
    (tmp / WRITER_FILE).unlink()  # the pid in the name still identifies the writer until the rename
    dest = root / final_name
    if dest.exists():
        old = root / f".old-{final_name}-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    if name is None:
        for old in checkpoint_dirs(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def load_trainer_state(ckpt: Path) -> dict:
    return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------- stale temporary dirs


def _proc_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22), or
    None where /proc is not available: with the pid it identifies a process even after pid reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the fields after "pid (comm) "
    return int(fields[19])  # field 22 of the whole line: starttime


def _writer() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _proc_start(os.getpid())}


def _writer_alive(writer: dict) -> bool:
    """Whether the process that wrote ``writer`` (pid, host, start) may still be running. A writer on
    another host cannot be checked from here and counts as alive."""
    if writer.get("host") not in (None, socket.gethostname()):
        return True
    pid = int(writer["pid"])
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    start = writer.get("start")
    return start is None or _proc_start(pid) in (None, start)


def clean_stale_checkpoint_dirs(output_dir: str | Path, log: Callable[[str], None] | None = print) -> list[Path]:
    """Remove the ``.tmp-*`` / ``.old-*`` directories of saves killed mid-way in ``output_dir`` and
    ``output_dir/checkpoints``; returns the paths removed (or restored) and logs one line.

    A directory is stale when its writer (``writer.json``, else the pid in its name on this host)
    is no longer running; one being written by a live process is kept. An ``.old-NAME-PID`` left
    between the two renames of a replacement is the complete previous ``NAME``: it is renamed back
    when ``NAME`` is missing, removed otherwise.
    """
    out = Path(output_dir)
    done: list[Path] = []
    restored: list[str] = []
    for root in (out, out / "checkpoints"):
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            m = TMP_RE.match(d.name)
            if m is None or not d.is_dir():
                continue
            writer = {"pid": int(m.group(3)), "host": None}
            try:
                writer.update(json.loads((d / WRITER_FILE).read_text()))
            except (OSError, ValueError):
                pass  # written before the marker, or after it was removed: the pid in the name
            if _writer_alive(writer):
                continue
            final = root / m.group(2)
            if m.group(1) == "old" and not final.exists() and (d / "meta.json").is_file():
                os.replace(d, final)
                restored.append(final.name)
            else:
                shutil.rmtree(d, ignore_errors=True)
            done.append(d)
    if done and log is not None:
        what = f"removed {len(done) - len(restored)} stale temporary checkpoint dir(s) left by interrupted saves"
        if restored:
            what += f", restored {', '.join(restored)} from its .old copy"
        log(f"checkpoints: {what} in {out}: {', '.join(d.name for d in done)}")
    return done
