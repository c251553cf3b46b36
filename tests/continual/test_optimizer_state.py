"""``continual.keep_optimizer_state``: AdamW's state carried by parameter name, and resume."""

from __future__ import annotations

import torch
from torch import nn

from mmtune.continual import run_continual
from mmtune.continual.optimizer_state import load_param_states, param_states


def _adam_steps(model, opt, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()


def test_state_is_carried_by_name_and_new_parameters_start_fresh():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _adam_steps(model, opt, 3)
    saved = param_states(model, opt)
    assert set(saved) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert all(float(s["step"]) == 3 for s in saved.values())
    # The next task trains layer 1 and a new head; layer 0 is frozen (not in the optimizer).
    model.append(nn.Linear(2, 2))
    model[0].requires_grad_(False)
    new = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    restored = load_param_states(model, new, saved)
    assert restored == ["1.bias", "1.weight"]
    st = new.state[model[1].weight]
    assert torch.equal(st["exp_avg"], saved["1.weight"]["exp_avg"]) and float(st["step"]) == 3
    assert st["exp_avg"] is not saved["1.weight"]["exp_avg"]  # a copy: the saved state stays as it was
    assert model[2].weight not in new.state
    _adam_steps(model, new, 1)  # AdamW continues from the carried state
    assert float(new.state[model[1].weight]["step"]) == 4 and float(new.state[model[2].weight]["step"]) == 1


def test_keep_optimizer_state_changes_later_tasks_and_resumes_exactly(make_recipe, tmp_path):
    def run(out, keep, **kw):
        return run_continual(make_recipe(out, "replay", {"buffer_size": 30}, n_tasks=3, max_steps=10,
                                         keep_optimizer_state=keep), log=lambda s: None, **kw)

    reset, kept = run(tmp_path / "r", False), run(tmp_path / "k", True)
    assert reset["losses"][0] == kept["losses"][0]  # the first task starts fresh either way
    assert reset["losses"][1] != kept["losses"][1]
    assert (tmp_path / "k" / "continual" / "state" / "optimizer.pt").is_file()
    assert not (tmp_path / "r" / "continual" / "state" / "optimizer.pt").exists()
    part = run(tmp_path / "p", True, stop_after=1)
    assert not part["finished"]
    resumed = run(tmp_path / "p", True, resume=True)
    assert resumed["R"] == kept["R"] and resumed["losses"] == kept["losses"]
    assert resumed["metrics"] == kept["metrics"]  # bit-identical: the carried state was saved and restored
