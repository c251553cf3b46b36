"""The training loop: exact resume, gradient accumulation equivalence, NaN handling, plugins."""

import json

import pytest
import torch

from mmtune.config import TrainConfig
from mmtune.errors import MMTuneError
from mmtune.train.checkpoint import checkpoint_dirs, latest_checkpoint
from mmtune.train.loop import Trainer
from mmtune.train.objectives import LossOutput, Objective


class ToyObjective(Objective):
    """Sum of squared errors of a regression; count = rows."""

    def count(self, batch):
        return batch["x"].shape[0]

    def __call__(self, model, batch):
        pred = model(batch["x"])
        return LossOutput(((pred - batch["y"]) ** 2).sum(), batch["x"].shape[0], pred)


def toy_rows(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(n, 1, generator=g)
    return [{"x": x[i], "y": y[i]} for i in range(n)]


def collate(rows):
    return {"x": torch.stack([r["x"] for r in rows]), "y": torch.stack([r["y"] for r in rows])}


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=8, batch_size=8, lr=1e-2, progress=False,
                tensorboard=False, warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls(tmp_path):
    res = Trainer(make_model(), ToyObjective(), toy_rows(), collate, cfg(tmp_path, max_steps=40)).fit()
    assert res["losses"][-1] < 0.3 * res["losses"][0]


def test_resume_is_exact(tmp_path):
    full = Trainer(make_model(), ToyObjective(), toy_rows(), collate, cfg(tmp_path / "a")).fit()

    class Crash(Exception):
        pass

    def crash_after(step):
        def flag():
            if t.step == step:
                raise Crash
            return False
        return flag

    t = Trainer(make_model(), ToyObjective(), toy_rows(), collate, cfg(tmp_path / "b", save_every=3))
    t.stop_flag = crash_after(5)
    with pytest.raises(Crash):
        t.fit()
    assert latest_checkpoint(tmp_path / "b").name == "step-00000003"
    # A different init proves the weights come from the checkpoint.
    t2 = Trainer(make_model(seed=1), ToyObjective(), toy_rows(), collate, cfg(tmp_path / "b", save_every=3))
    res = t2.fit(resume=True)
    assert len(res["losses"]) == 8
    for a, b in zip(full["losses"], res["losses"]):
        assert abs(a - b) <= 1e-6


def test_grad_accum_matches_large_batch(tmp_path):
    # Same data order in both (a 16-row batch is two consecutive 8-row batches); dropout draws
    # differ by layout, so compare without dropout.
    ma, mb = make_model(), make_model()
    ma[1].p = mb[1].p = 0.0
    ra = Trainer(ma, ToyObjective(), toy_rows(), collate, cfg(tmp_path / "c", batch_size=16, max_steps=3)).fit()
    rb = Trainer(mb, ToyObjective(), toy_rows(), collate,
                 cfg(tmp_path / "d", batch_size=8, grad_accum=2, max_steps=3)).fit()
    for x, y in zip(ra["losses"], rb["losses"]):
        assert abs(x - y) < 1e-5
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


class NaNAt(Objective):
    def __init__(self, at):
        self.at, self.calls = at, 0

    def count(self, batch):
        return batch["x"].shape[0]

    def __call__(self, model, batch):
        self.calls += 1
        loss = ((model(batch["x"]) - batch["y"]) ** 2).sum()
        if self.calls == self.at:
            loss = loss * float("nan")
        return LossOutput(loss, batch["x"].shape[0])


def test_nan_stops_naming_step(tmp_path):
    with pytest.raises(MMTuneError, match="step 3"):
        Trainer(make_model(), NaNAt(3), toy_rows(), collate, cfg(tmp_path, save_every=1)).fit()
    # The checkpoints written before the NaN are complete, and none holds a NaN step.
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000001", "step-00000002"]


def test_nan_skip_counts(tmp_path):
    res = Trainer(make_model(), NaNAt(3), toy_rows(), collate, cfg(tmp_path, nan_policy="skip")).fit()
    assert res["skipped_steps"] == 1 and res["steps"] == 8


def test_plugin_terms_added_and_logged(tmp_path):
    class L2:
        def __init__(self, model):
            self.model = model

        def loss_terms(self, batch, out):
            return {"l2": 0.5 * sum((p ** 2).sum() for p in self.model.parameters())}

    m = make_model()
    t = Trainer(m, ToyObjective(), toy_rows(), collate, cfg(tmp_path), plugins=[L2(m)])
    t.fit()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("l2" in r for r in rows if "loss" in r)
    norm = sum(float((p.detach() ** 2).sum()) for p in m.parameters())
    m0 = make_model()
    Trainer(m0, ToyObjective(), toy_rows(), collate, cfg(tmp_path / "plain")).fit()
    assert norm < sum(float((p.detach() ** 2).sum()) for p in m0.parameters())


def test_keep_last_prunes(tmp_path):
    Trainer(make_model(), ToyObjective(), toy_rows(), collate, cfg(tmp_path, save_every=1, keep_last=2)).fit()
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-00000007", "step-00000008"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_ctrl_c_saves_a_checkpoint_and_resumes(tmp_path):
    import os
    import signal

    full = Trainer(make_model(), ToyObjective(), toy_rows(), collate, cfg(tmp_path / "a")).fit()
    t = Trainer(make_model(), ToyObjective(), toy_rows(), collate, cfg(tmp_path / "b"))

    def flag():
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C just after step 3
        return False

    t.stop_flag = flag
    with pytest.raises(MMTuneError, match="interrupted at step 3"):
        t.fit()
    assert latest_checkpoint(tmp_path / "b").name == "step-00000003"
    res = Trainer(make_model(seed=3), ToyObjective(), toy_rows(), collate, cfg(tmp_path / "b")).fit(resume=True)
    assert all(abs(a - b) <= 1e-6 for a, b in zip(full["losses"], res["losses"]))
