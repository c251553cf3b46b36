"""Temporary checkpoint directories of saves killed mid-way are cleaned at start-up and on --resume;
one that a live process is writing is never touched."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import torch

from mmtune.config import TrainConfig
from mmtune.train.checkpoint import WRITER_FILE, _proc_start, clean_stale_checkpoint_dirs, latest_checkpoint
from mmtune.train.loop import Trainer
from mmtune.train.objectives import LossOutput, Objective

# A process that starts a real save and hangs inside it (torch.save of the trainer state never
# returns), like a run killed while writing a large checkpoint.
HANGING_SAVE = textwrap.dedent("""
    import sys, time, torch
    from mmtune.train import checkpoint
    checkpoint.torch.save = lambda *a, **k: time.sleep(3600)
    checkpoint.save_checkpoint(sys.argv[1], int(sys.argv[2]), torch.nn.Linear(2, 2), {"step": 0})
""")


class MSE(Objective):
    def count(self, batch):
        return batch["x"].shape[0]

    def __call__(self, model, batch):
        pred = model(batch["x"])
        return LossOutput(((pred - batch["y"]) ** 2).sum(), batch["x"].shape[0], pred)


def _trainer(out):
    rows = [{"x": torch.randn(2), "y": torch.randn(1)} for _ in range(8)]
    cfg = TrainConfig(output_dir=str(out), max_steps=2, batch_size=4, progress=False, tensorboard=False,
                      warmup_steps=0, save_every=1)
    collate = lambda rs: {k: torch.stack([r[k] for r in rs]) for k in ("x", "y")}  # noqa: E731
    torch.manual_seed(0)
    return Trainer(torch.nn.Linear(2, 1), MSE(), rows, collate, cfg)


def _start_hanging_save(out, step):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HANGING_SAVE, str(out), str(step)], env=env)
    tmp = out / "checkpoints" / f".tmp-step-{step:08d}-{proc.pid}"
    deadline = time.time() + 60
    while not (tmp / "model").is_dir():  # the model is written, the trainer state is being written
        assert proc.poll() is None and time.time() < deadline, "the hanging save did not start"
        time.sleep(0.05)
    return proc, tmp


def test_stale_tmp_dirs_go_live_ones_stay(tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    live_proc, live = _start_hanging_save(out, 7)
    killed_proc, killed = _start_hanging_save(out, 8)
    try:
        assert json.loads((live / WRITER_FILE).read_text()) == {
            "pid": live_proc.pid, "host": socket.gethostname(), "start": _proc_start(live_proc.pid)}
        killed_proc.send_signal(signal.SIGKILL)
        killed_proc.wait()
        # A writer from before markers existed (pid in the name only) whose process is gone; a pid that
        # now belongs to another process (start time differs); a writer on another machine.
        gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        unmarked = ckpts / f".tmp-step-00000005-{int(gone.stdout)}"
        unmarked.mkdir()
        reused = ckpts / ".tmp-step-00000006-123"
        reused.mkdir()
        (reused / WRITER_FILE).write_text(json.dumps({"pid": live_proc.pid, "host": socket.gethostname(),
                                                      "start": _proc_start(live_proc.pid) - 1}))
        remote = ckpts / f".tmp-step-00000004-{int(gone.stdout)}"
        remote.mkdir()
        (remote / WRITER_FILE).write_text(json.dumps({"pid": int(gone.stdout), "host": "another-node",
                                                      "start": 1}))
        logged = []
        removed = clean_stale_checkpoint_dirs(out, log=logged.append)
        assert sorted(p.name for p in removed) == sorted([killed.name, unmarked.name, reused.name])
        assert live.is_dir() and remote.is_dir() and not killed.exists() and not unmarked.exists()
        assert logged == [f"checkpoints: removed 3 stale temporary checkpoint dir(s) left by interrupted saves in "
                          f"{out}: {', '.join(sorted(p.name for p in removed))}"]
        assert clean_stale_checkpoint_dirs(out, log=logged.append) == [] and len(logged) == 1  # nothing left
    finally:
        live_proc.kill()
        live_proc.wait()


def test_trainer_cleans_at_start_and_on_resume(tmp_path, capsys):
    out = tmp_path / "run"
    proc, tmp = _start_hanging_save(out, 3)
    proc.kill()
    proc.wait()
    _trainer(out).fit()
    assert not tmp.exists()
    assert f"removed 1 stale temporary checkpoint dir(s) left by interrupted saves in {out}: {tmp.name}" \
        in capsys.readouterr().out
    # Killed between the two renames that replace a checkpoint of the same name: the complete old
    # one is renamed back, the new one's tmp dir removed; then --resume finds the checkpoint.
    final = latest_checkpoint(out)
    old = final.parent / f".old-{final.name}-{proc.pid}"
    os.replace(final, old)
    (final.parent / f".tmp-{final.name}-{proc.pid}").mkdir()
    assert latest_checkpoint(out) != final
    res = _trainer(out).fit(resume=True)
    assert res["steps"] == 2 and latest_checkpoint(out) == final
    assert not old.exists() and not (final.parent / f".tmp-{final.name}-{proc.pid}").exists()
    assert f"restored {final.name} from its .old copy" in capsys.readouterr().out
