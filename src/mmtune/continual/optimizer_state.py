"""``continual.keep_optimizer_state``: carry AdamW's per-parameter state from task to task.

Each task's :class:`~mmtune.train.loop.Trainer` builds a fresh optimizer. With the setting on,
the runner copies the state of every parameter the previous task's optimizer held (AdamW's
``exp_avg``, ``exp_avg_sq`` and ``step``) into the new optimizer, keyed by parameter name, so
parameters that train in both tasks continue with their moment estimates and bias correction,
as Avalanche's strategies do by default (its ``make_optimizer`` keeps the state of parameters it
already knows). Parameters new to the task (a new adapter) start fresh; the hyperparameters of
the groups (lr, weight decay) and the schedule come from the new task's optimizer.
"""

from __future__ import annotations

import torch


def param_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """The optimizer's state per parameter name, detached copies on the CPU."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in optimizer.state.items():
        name = names.get(id(p))
        if name is not None and st:
            out[name] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v) for k, v in st.items()}
    return out


def load_param_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer, states: dict[str, dict]) -> list[str]:
    """Give ``optimizer`` the saved state of each of its parameters found in ``states`` (same name
    and shape). Returns the names that were restored."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    restored = []
    for name, p in model.named_parameters():
        st = states.get(name)
        if id(p) not in in_opt or st is None:
            continue
        tensors = [v for k, v in st.items() if torch.is_tensor(v) and k != "step"]
        if any(v.shape != p.shape for v in tensors):
            continue
        # AdamW keeps ``step`` as a CPU tensor (unless fused / capturable): it stays where it was saved.
        optimizer.state[p] = {k: (v.clone() if k == "step" else v.to(p.device, p.dtype, copy=True))
                              if torch.is_tensor(v) else v for k, v in st.items()}
        restored.append(name)
    return sorted(restored)
