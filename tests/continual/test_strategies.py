"""Strategy plugins: hooks never mutate the loop's state, EWC's guard, teachers, A-GEM, adapters."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mmtune.config import validate_recipe
from mmtune.continual import run_continual
from mmtune.continual.benchmarks import DigitsBenchmark
from mmtune.continual.nets import ClassifierOut, DigitsMLP, DigitsTransformer
from mmtune.continual.runner import build_strategy
from mmtune.continual.strategies import STRATEGIES
from mmtune.continual.strategies.base import Teacher, kd_loss, snapshot
from mmtune.continual.strategies.distillation import AdaptersOff
from mmtune.errors import ConfigError, MMTuneError
from mmtune.train.loop import Trainer


class DropMLP(DigitsMLP):
    """A digits MLP with input dropout, so that every forward draws from the global RNG."""

    def __init__(self):
        super().__init__(64, 64, 2, 10)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return super().forward(self.drop(x))


def _setup(make_recipe, tmp_path, names: list[str], settings: dict | None = None, n_tasks: int = 2, scenario="class"):
    recipe = make_recipe(tmp_path, names[0], settings, n_tasks=n_tasks, max_steps=12, scenario=scenario)
    bench = DigitsBenchmark(recipe.continual)
    strategies = []
    for n in names:
        r = make_recipe(tmp_path, n, settings if n == names[0] else None, n_tasks=n_tasks, max_steps=12,
                          scenario=scenario)
        strategies.append(build_strategy(r, bench, torch.device("cpu"), tmp_path / n, log=lambda s: None))
    return recipe, bench, strategies


def _train_sequence(make_recipe, tmp_path, order: list[int], names=("replay", "ewc")):
    recipe, bench, strategies = _setup(make_recipe, tmp_path, list(names), {"buffer_size": 50})
    strategies[1].settings = strategies[1].parse_settings({"fisher_samples": 16})
    torch.manual_seed(0)
    model = DropMLP()
    objective = strategies[0].ctx.objective
    logged = []
    for t, task in enumerate(bench.tasks):
        for s in strategies:
            s.before_task(model, task.info)
        cfg = recipe.train.model_copy(update={"output_dir": str(tmp_path / f"o{order}" / str(t)), "seed": t})
        res = Trainer(model, objective, task.train, bench.collate, cfg, plugins=[strategies[i] for i in order]).fit()
        logged.append(res["losses"])
        for s in strategies:
            s.after_task(model, task.info, task.train)
    return model, logged


def test_plugin_order_does_not_change_results(make_recipe, tmp_path):
    """Replay runs extra forwards (dropout draws) and EWC adds a penalty: with hooks that only return
    loss terms and run under their own RNG, the order of the plugins does not matter."""
    m1, l1 = _train_sequence(make_recipe, tmp_path, [0, 1])
    m2, l2 = _train_sequence(make_recipe, tmp_path, [1, 0])
    assert l1[1] == pytest.approx(l2[1], abs=1e-6)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_extra_forwards_leave_the_global_rng_alone(make_recipe, tmp_path):
    # Same sequence with and without a replay plugin that is empty on task 1: identical task-1 losses
    # are trivial, so compare the RNG state around a loss_terms call that runs a replay forward.
    recipe, bench, (replay,) = _setup(make_recipe, tmp_path, ["replay"])
    model = DropMLP()
    replay.before_task(model, bench.tasks[0].info)
    replay.after_task(model, bench.tasks[0].info, bench.tasks[0].train)
    batch = bench.collate(bench.tasks[1].train[:8])
    out = replay.ctx.objective(model, batch)
    state = torch.get_rng_state()
    terms = replay.loss_terms(batch, out)
    assert set(terms) == {"replay"} and terms["replay"].requires_grad
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------------------------------------
# EWC guard


def test_ewc_fisher_is_normalised_to_max_one(make_recipe, tmp_path):
    recipe, bench, (ewc,) = _setup(make_recipe, tmp_path, ["ewc"], {"fisher_samples": 32})
    model = DigitsMLP(64, 32, 1, 10)
    ewc.before_task(model, bench.tasks[0].info)
    ewc.after_task(model, bench.tasks[0].info, bench.tasks[0].train)
    fisher, anchor = ewc.penalties[0]
    assert max(float(f.max()) for f in fisher.values()) == pytest.approx(1.0)
    assert min(float(f.min()) for f in fisher.values()) >= 0
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    ewc.before_task(model, bench.tasks[1].info)
    assert float(ewc.penalty().detach()) == 0.0  # at the anchor


def test_ewc_large_lambda_stops_before_the_task_with_a_clear_error(make_recipe, tmp_path):
    r = make_recipe(tmp_path, "ewc", {"lambda": 1e9, "fisher_samples": 32}, n_tasks=2, max_steps=15)
    with pytest.raises(MMTuneError, match=r"continual\.strategy\.settings\.ewc\.lambda to at most 2000") as e:
        run_continual(r, log=lambda s: None)
    assert "too large for train.lr=0.001" in str(e.value) and "on_blowup: scale" in str(e.value)


def test_ewc_penalty_blowup_is_detected_while_training(make_recipe, tmp_path):
    # With the stiffness check off, the running check catches the penalty dwarfing the task loss.
    r = make_recipe(tmp_path, "ewc", {"lambda": 1e9, "fisher_samples": 32, "max_stiffness": None}, n_tasks=2,
                    max_steps=15)
    with pytest.raises(MMTuneError, match=r"exceeds 100x the loss at the start of task '2-3'"):
        run_continual(r, log=lambda s: None)


def test_ewc_guard_scales_lambda_and_learns_the_task(make_recipe, tmp_path):
    settings = {"lambda": 1e9, "fisher_samples": 32}
    scaled = run_continual(make_recipe(tmp_path / "s", "ewc", {**settings, "on_blowup": "scale"}, n_tasks=2,
                                       max_steps=30), log=lambda s: None)
    # Without the guard the same lambda silently freezes the model: the new task is not learned.
    silent = run_continual(make_recipe(tmp_path / "u", "ewc", {**settings, "blowup_factor": 1e30,
                                                               "max_stiffness": None}, n_tasks=2, max_steps=30),
                           log=lambda s: None)
    st = scaled["strategy_state"]
    assert len(st["events"]) == 1 and st["scale"] * 1e9 * 1e-3 == pytest.approx(1.0)  # stiffness 1
    assert scaled["R"][1][1] > 0.8
    assert silent["R"][1][1] < 0.1
    assert all(x == x and x < float("inf") for x in scaled["losses"][1])


def test_ewc_default_lambda_does_not_trigger_the_guard(make_recipe, tmp_path):
    res = run_continual(make_recipe(tmp_path, "ewc", {"fisher_samples": 32}, n_tasks=2, max_steps=30),
                        log=lambda s: None)
    assert res["strategy_state"]["events"] == [] and res["strategy_state"]["scale"] == 1.0


def test_online_ewc_keeps_one_accumulated_penalty(make_recipe, tmp_path):
    recipe, bench, (ewc,) = _setup(make_recipe, tmp_path, ["online_ewc"], {"fisher_samples": 16, "gamma": 0.5}, n_tasks=3)
    model = DigitsMLP(64, 16, 1, 10)
    for task in bench.tasks[:2]:
        ewc.before_task(model, task.info)
        ewc.after_task(model, task.info, task.train)
    assert len(ewc.penalties) == 1
    fisher = ewc.penalties[0][0]
    # F = 0.5 * F_1 + F_2 with both normalised to max 1: the max lies in [1, 1.5].
    assert 1.0 <= max(float(f.max()) for f in fisher.values()) <= 1.5


# ---------------------------------------------------------------------------------------------
# Teachers and distillation


def test_kd_loss_matches_the_formula_and_is_zero_for_equal_outputs():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    T = 2.0
    q = torch.softmax(t / T, -1)
    manual = (q * (q.log() - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert kd_loss(s, t, T) == pytest.approx(float(manual), rel=1e-5)
    assert float(kd_loss(s, s, T)) == pytest.approx(0.0, abs=1e-6)
    groups = [[0, 1], [2, 3]]
    per_group = [kd_loss(s[:, g_], t[:, g_], T) for g_ in groups]
    assert kd_loss(s, t, T, groups) == pytest.approx(float(sum(per_group) / 2), rel=1e-5)


def test_teacher_is_the_snapshotted_model():
    torch.manual_seed(0)
    model = DigitsMLP(64, 16, 1, 10)
    x = torch.randn(5, 64)
    before = model(x).logits.detach()
    teacher = Teacher(model, snapshot(model))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    assert not torch.allclose(model(x).logits, before)
    out = teacher(x)
    assert torch.allclose(out.logits, before, atol=1e-6) and not out.logits.requires_grad


def test_peft_teacher_with_adapters_off_is_the_base_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = DigitsMLP(64, 16, 1, 10)
    x = torch.randn(5, 64)
    ref = base(x).logits.detach()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["fcs.0", "head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    assert not torch.allclose(model(x).logits, ref, atol=1e-4)
    assert torch.allclose(AdaptersOff(model)(x).logits, ref, atol=1e-6)
    # LwF's teacher on a PEFT model snapshots only the adapter weights, and keeps answering as before.
    snap = snapshot(model)
    assert snap and all("lora_" in n for n in snap)
    before = model(x).logits.detach()
    teacher = Teacher(model, snap)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(1.0)
    assert not torch.allclose(model(x).logits, before, atol=1e-4)
    assert torch.allclose(teacher(x).logits, before, atol=1e-6)


def _first_term(out_dir, task_dir: str, key: str) -> float:
    rows = [json.loads(x) for x in (out_dir / "tasks" / task_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if key in r][0][key]


@pytest.mark.parametrize("name,key", [("lwf", "lwf"), ("feature_kd", "feature_kd"), ("zscl", "zscl")])
def test_distillation_terms_start_at_zero_and_grow(make_recipe, tmp_path, name, key):
    """At the first step of task 2 the student equals the teacher (the model before the task), so the
    term is 0; ZSCL's teacher is the untrained model, so its term is 0 at the first step of task 1."""
    res = run_continual(make_recipe(tmp_path, name, n_tasks=2, max_steps=20), log=lambda s: None)
    task = "01-0-1" if name == "zscl" else "02-2-3"
    rows = [json.loads(x) for x in (tmp_path / "tasks" / task / "metrics.jsonl").read_text().splitlines()]
    terms = [r[key] for r in rows if key in r]
    assert terms[0] == pytest.approx(0.0, abs=1e-5)
    assert max(terms) > 1e-3
    assert res["finished"]


def test_lwf_distils_over_old_classes_only(make_recipe, tmp_path):
    recipe, bench, (lwf,) = _setup(make_recipe, tmp_path, ["lwf"])
    assert bench.kd_groups([bench.tasks[0].info]) == [[0, 1]]
    recipe_t, bench_t, _ = _setup(make_recipe, tmp_path, ["lwf"], scenario="task", n_tasks=3)
    assert bench_t.kd_groups([t.info for t in bench_t.tasks[:2]]) == [[0, 1], [2, 3]]


# ---------------------------------------------------------------------------------------------
# Replay family


def test_derpp_stores_the_logits_of_the_model_at_the_end_of_the_task(make_recipe, tmp_path):
    recipe, bench, (der,) = _setup(make_recipe, tmp_path, ["derpp"], {"buffer_size": 20})
    torch.manual_seed(0)
    model = DigitsMLP(64, 16, 1, 10)
    der.before_task(model, bench.tasks[0].info)
    der.after_task(model, bench.tasks[0].info, bench.tasks[0].train)
    items = der.buffer.items()
    assert len(items) == 20
    x = torch.stack([it["x"] for it in items])
    stored = torch.stack([it["_logits"][0] for it in items])
    assert torch.allclose(stored, model(x).logits.detach(), atol=1e-6)


def test_agem_projects_conflicting_gradients(make_recipe, tmp_path):
    recipe, bench, (agem,) = _setup(make_recipe, tmp_path, ["agem"], {"buffer_size": 30, "sample_size": 30})
    torch.manual_seed(0)
    model = DigitsMLP(64, 16, 1, 10)
    agem.before_task(model, bench.tasks[0].info)
    agem.after_task(model, bench.tasks[0].info, bench.tasks[0].train)
    # Reference gradient on the whole memory (sample_size = buffer size: the same examples).
    loss, _ = agem.mean_loss(model, agem.buffer.items())
    g_ref = torch.autograd.grad(loss, list(model.parameters()))
    for sign, projected in ((-1.0, True), (1.0, False)):
        for p, r in zip(model.parameters(), g_ref):
            p.grad = sign * r.clone() + 0.1 * torch.randn_like(r)
        before = [p.grad.clone() for p in model.parameters()]
        dot0 = sum(float((g * r).sum()) for g, r in zip(before, g_ref))
        agem.after_backward(model)
        dot1 = sum(float((p.grad * r).sum()) for p, r in zip(model.parameters(), g_ref))
        if projected:
            assert dot0 < 0 and dot1 == pytest.approx(0.0, abs=1e-4)
        else:
            assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    assert agem.projections == 1 and agem.steps == 2


def test_joint_trains_on_the_union(make_recipe, tmp_path):
    recipe, bench, (joint,) = _setup(make_recipe, tmp_path, ["joint"], n_tasks=3)
    seen = [t.train for t in bench.tasks[:2]]
    rows = joint.train_rows(bench.tasks[1].info, bench.tasks[1].train, seen)
    assert len(rows) == len(seen[0]) + len(seen[1])


# ---------------------------------------------------------------------------------------------
# Architecture and prompts


def test_task_lora_trains_only_its_adapter_and_forgets_nothing(make_recipe, tmp_path):
    res = run_continual(make_recipe(tmp_path, "task_lora", scenario="task", n_tasks=3, max_steps=25),
                        log=lambda s: None)
    R = res["R"]
    for j in range(3):
        assert all(R[i][j] == R[j][j] for i in range(j, 3))  # exactly no forgetting
    assert min(R[i][i] for i in range(3)) > 0.9
    model = res["model"]
    strat = STRATEGIES.get("task_lora")
    recipe, bench, (tl,) = _setup(make_recipe, tmp_path / "x", ["task_lora"], scenario="task")
    m = tl.setup(DigitsMLP(64, 16, 2, 10))
    tl.before_task(m, bench.tasks[1].info)
    trainable = sorted(n for n, p in m.named_parameters() if p.requires_grad)
    assert trainable and all(".task1." in n and "lora_" in n for n in trainable)
    assert len(trainable) == 2 * 3  # lora_A and lora_B on fcs.0, fcs.1, head
    assert strat.needs_task_id and model is not None


def test_task_lora_needs_task_ids(make_recipe, tmp_path):
    with pytest.raises(ConfigError, match="scenario: task"):
        run_continual(make_recipe(tmp_path, "task_lora", n_tasks=2, max_steps=2), log=lambda s: None)


def test_olora_penalty_and_frozen_old_adapters(make_recipe, tmp_path):
    recipe, bench, (ol,) = _setup(make_recipe, tmp_path, ["olora"], {"orth_weight": 0.5}, scenario="domain", n_tasks=3)
    torch.manual_seed(0)
    model = ol.setup(DigitsMLP(64, 16, 1, 10))
    ol.before_task(model, bench.tasks[0].info)
    assert ol.loss_terms({}, None) == {}  # no old adapter yet
    ol.after_task(model, bench.tasks[0].info, [])
    ol.before_task(model, bench.tasks[1].info)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".task1." in n for n in trainable)
    manual = 0.0
    for m in model.modules():
        if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict) and "task1" in m.lora_A:
            manual += float((m.lora_A["task0"].weight @ m.lora_A["task1"].weight.T).abs().sum().detach())
    terms = ol.loss_terms({}, None)
    assert float(terms["olora_orth"].detach()) == pytest.approx(0.5 * manual, rel=1e-5)
    assert set(model.base_model.active_adapters) == {"task0", "task1", "task2"}


def test_l2p_trains_prompts_keys_and_head(make_recipe, tmp_path):
    net = {"arch": "transformer", "hidden": 32, "depth": 1, "heads": 2}
    recipe, bench, (l2p,) = _setup(make_recipe, tmp_path, ["l2p"], {"pool_size": 6, "prompt_length": 2, "top_k": 3})
    model = l2p.setup(DigitsTransformer(64, 32, 1, 2, 10))
    l2p.before_task(model, bench.tasks[0].info)
    assert model.train_classes == [0, 1]  # class-incremental: other logits masked while training
    model.train()
    assert (model(torch.rand(3, 64)).logits[:, 2:] < -1e3).all()
    model.eval()
    assert (model(torch.rand(3, 64)).logits[:, 2:] > -1e3).all()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["base.head.bias", "base.head.weight", "pool.keys", "pool.prompts"]
    out = model(torch.rand(4, 64))
    assert isinstance(out, ClassifierOut) and out.logits.shape == (4, 10) and out.aux["key_loss"].requires_grad
    # Without the class-incremental train mask, so that the head also learns to reject the other classes.
    res = run_continual(make_recipe(tmp_path / "run", "l2p", {"pool_size": 6, "prompt_length": 2, "top_k": 3,
                                                               "train_mask": False},
                                      n_tasks=2, max_steps=40, net=net, train={"lr": 1e-2}), log=lambda s: None)
    assert res["R"][0][0] > 0.8  # the first task is learned through prompts and head alone
    with pytest.raises(ConfigError, match="transformer"):
        run_continual(make_recipe(tmp_path / "mlp", "l2p", n_tasks=2, max_steps=2), log=lambda s: None)


# ---------------------------------------------------------------------------------------------
# Settings


def test_strategy_settings_are_validated_with_suggestions():
    base = {"benchmark": "digits", "tasks": [{"name": "a", "source": "digits:0,1"}]}

    def recipe(strategy):
        return validate_recipe({"continual": {**base, "strategy": strategy}})

    with pytest.raises(ConfigError, match="Did you mean 'lambda'"):
        recipe({"name": "ewc", "settings": {"ewc": {"lamda": 5}}})
    with pytest.raises(ConfigError, match="Did you mean 'ewc'"):
        recipe({"name": "ewx"})
    with pytest.raises(ConfigError, match="Did you mean 'replay'"):
        recipe({"name": "ewc", "settings": {"replya": {"buffer_size": 5}}})
    with pytest.raises(ConfigError, match="buffer_size"):
        recipe({"name": "ewc", "settings": {"replay": {"buffer_size": -1}}})  # unused entries are checked too
    ok = recipe({"name": "ewc", "settings": {"ewc": {"lambda": 5}, "replay": {"buffer_size": 10}}})
    assert STRATEGIES.get("ewc").parse_settings(ok.continual.strategy.chosen_settings()).lambda_ == 5
    assert recipe({"name": "lwf", "settings": {"ewc": {"lambda": 5}}}).continual.strategy.chosen_settings() == {}


def test_every_strategy_is_registered_and_documented():
    expected = {"naive", "joint", "ewc", "online_ewc", "lwf", "feature_kd", "zscl", "replay", "derpp", "agem",
                "gem", "task_lora", "olora", "l2p"}
    assert set(STRATEGIES.names()) == expected
    for name in expected:
        cls = STRATEGIES.get(name)
        assert cls.__doc__
        for field, info in cls.Settings.model_fields.items():
            assert info.description, f"{name}.{field} has no description"
