"""The speed plan (mmtune.train.fast_path): the CPU fast path on this machine; with CUDA,
flash-attn and liger-kernel mocked as present, flash varlen + Liger's fused loss + bf16 +
compile; fallbacks when they are missing; the varlen collate's boundaries; and packed rows under
each packing mode give every sample the logits it has alone."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import mmtune.train.attention as attention
import mmtune.train.fast_path as fast_path
from mmtune.config import TrainConfig, validate_recipe
from mmtune.data.packing import VARLEN_KEYS, collate_packed, pack_examples
from mmtune.errors import ConfigError
from mmtune.train.fast_path import bf16_autocast, causal_collate, plan_for_recipe, plan_speed
from mmtune.train.objectives import model_inputs


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch says it has a bf16-capable CUDA device; flash-attn (2 only) and liger-kernel are
    'installed' as far as their availability checks can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    installed = {"flash": True, "liger_kernel": True, "triton": True}
    monkeypatch.setattr(attention, "flash_available", lambda version=2: installed["flash"] and version == 2)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name in ("liger_kernel", "triton"):
            return importlib.machinery.ModuleSpec(name, None) if installed[name] else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return installed


def test_cpu_plan_is_the_cpu_fast_path():
    plan = plan_speed("cpu")
    assert plan.attention.implementation == "sdpa" and "no CUDA device" in plan.attention.reason
    assert plan.packing == "position_ids" and not plan.varlen
    # The chunked fused loss by default (faster and smaller on CPU); compile waits for the run's size.
    assert plan.loss == "chunked" and not plan.compile and not plan.gradient_checkpointing
    assert "not known" in plan.reasons["compile"]
    assert plan_speed("cpu", fused_loss=False).loss == "plain"
    assert plan.dtype == torch.float32 and not plan.bf16_autocast
    assert plan.load_kwargs() == {"attn_implementation": "sdpa", "dtype": torch.float32,
                                  "gradient_checkpointing": False}
    # The fused objective on CPU is the chunked loss, never Liger (it needs CUDA), even when installed.
    assert plan_speed("cpu", objective="sft-fused").loss == "chunked"
    assert plan_speed("cpu", fused_loss=True).loss == "chunked"
    assert plan_speed("cpu", packing=False).packing == "padded"
    lines = plan.lines()
    assert lines[0] == "speed plan on cpu:" and len(lines) == 7 and all(line.strip() for line in lines)


def test_cpu_compile_pays_on_long_packed_runs_only(monkeypatch):
    from mmtune.train.fast_path import CPU_COMPILE_MIN_FLOP, run_work_flop, settle_compile

    long, short = 2 * CPU_COMPILE_MIN_FLOP, CPU_COMPILE_MIN_FLOP / 10
    assert plan_speed("cpu", work_flop=long).compile and "long packed run" in plan_speed("cpu", work_flop=long).reasons["compile"]
    assert not plan_speed("cpu", work_flop=short).compile
    assert "short run" in plan_speed("cpu", work_flop=short).reasons["compile"]
    assert not plan_speed("cpu", work_flop=long, packing=False).compile  # padded shapes would recompile
    assert not plan_speed("cpu", work_flop=long, world_size=2).compile
    assert not plan_speed("cpu", work_flop=long, quantized=True).compile
    assert not plan_speed("cpu", work_flop=long, compile=False).compile
    # 60 steps of SmolLM2-135M on 8 rows of 512 tokens is a long run; 5 steps is not.
    assert run_work_flop(134_515_008, 60, 4096) > CPU_COMPILE_MIN_FLOP > run_work_flop(134_515_008, 5, 4096)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "no C++ compiler" in plan_speed("cpu", work_flop=long).reasons["compile"]
    monkeypatch.undo()
    # settle_compile: the CPU auto choice from the work; an explicit setting or CUDA stays as planned.
    recipe = validate_recipe({})
    settled = settle_compile(plan_speed("cpu"), recipe, long)
    assert settled.compile and settled.loss == plan_speed("cpu").loss
    assert not settle_compile(plan_speed("cpu"), recipe, short).compile
    pinned = validate_recipe({"train": {"compile": False}})
    assert not settle_compile(plan_speed("cpu", compile=False), pinned, long).compile


def test_gpu_plan_takes_flash_varlen_liger_bf16_and_compile(fake_gpu):
    plan = plan_speed("cuda")
    assert plan.attention.implementation == "flash_attention_2" and plan.attention.varlen
    assert plan.packing == "varlen" and plan.loss == "liger" and plan.compile
    assert plan.dtype == torch.bfloat16 and plan.bf16_autocast and not plan.gradient_checkpointing
    assert plan.load_kwargs()["attn_implementation"] == "flash_attention_2"
    assert plan_speed("cuda", gradient_checkpointing=True).gradient_checkpointing  # by choice only
    assert not plan_speed("cuda", world_size=2).compile and not plan_speed("cuda", quantized=True).compile
    assert not plan_speed("cuda", compile=False).compile
    assert plan_speed("cuda", fused_loss=False).loss == "plain"
    assert plan_speed("cuda", attention="sdpa").packing == "position_ids"  # the user's kernel wins
    # fp32 weights cannot run flash: sdpa with the mask, still fused and compiled.
    fp32 = plan_speed("cuda", model_dtype="float32", precision="fp32")
    assert fp32.attention.implementation == "sdpa" and fp32.packing == "position_ids" and not fp32.bf16_autocast


def test_gpu_plan_without_the_optional_packages(fake_gpu):
    fake_gpu.update(flash=False, liger_kernel=False)
    plan = plan_speed("cuda")
    assert plan.attention.implementation == "sdpa" and "flash-attn is not installed" in plan.attention.reason
    assert plan.packing == "position_ids"
    assert plan.loss == "chunked" and "liger-kernel is not installed" in plan.reasons["loss"]
    assert plan.dtype == torch.bfloat16 and plan.bf16_autocast and plan.compile
    fake_gpu.update(triton=False)
    assert not plan_speed("cuda").compile and "triton" in plan_speed("cuda").reasons["compile"]


def test_plan_for_recipe_reads_the_settings(fake_gpu):
    recipe = validate_recipe({"model": {"gradient_checkpointing": True}, "train": {"compile": False}})
    plan = plan_for_recipe(recipe, "cuda")
    assert (plan.attention.implementation, plan.loss, plan.compile, plan.gradient_checkpointing) == (
        "flash_attention_2", "liger", False, True)
    dpo = plan_for_recipe(validate_recipe({"objective": "dpo"}), "cuda")
    assert dpo.packing == "padded" and dpo.loss == "plain"  # pairs are never packed; DPO needs logits
    assert plan_for_recipe(validate_recipe({"data": {"packing": False}}), "cpu").packing == "padded"
    with pytest.raises(ConfigError, match="train.fused_loss=false contradicts objective sft-fused"):
        plan_for_recipe(validate_recipe({"objective": "sft-fused", "train": {"fused_loss": False}}), "cpu")
    with pytest.raises(ConfigError, match="objective 'dpo' computes its own loss"):
        plan_for_recipe(validate_recipe({"objective": "dpo", "train": {"fused_loss": True}}), "cpu")


def test_bf16_rule_is_the_trainers(tmp_path):
    from mmtune.distributed import train_in_bf16
    from mmtune.train.loop import Trainer
    from mmtune.train.objectives import CausalLMObjective

    model = torch.nn.Linear(2, 2)
    for precision in ("auto", "fp32", "bf16"):
        cfg = TrainConfig(output_dir=str(tmp_path), precision=precision, progress=False, tensorboard=False)
        trainer = Trainer(model, CausalLMObjective(), [{"x": 1}], lambda b: {}, cfg, device="cpu")
        assert trainer.use_bf16 == bf16_autocast(precision, "cpu") == train_in_bf16(precision, "cpu")
        assert plan_speed("cpu", precision=precision).bf16_autocast == trainer.use_bf16


def _rows(lengths_per_row: list[list[int]], vocab: int = 1000, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for lengths in lengths_per_row:
        ids = torch.randint(1, vocab, (sum(lengths),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "position_ids": [p for n in lengths for p in range(n)],
                     "lengths": lengths})
    return rows


def test_varlen_collate_gives_the_sample_boundaries():
    rows = _rows([[5, 3, 4], [6, 2]])  # widths 12 and 8: the second row gets 4 padding tokens
    batch = collate_packed(rows, pad_id=0, varlen=True)
    # Flattened over the batch (B*T = 24): row 0 at 0..12, row 1 at 12..24, its padding with its last sample.
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 8, 12, 18, 24]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["cu_seq_lens_k"] is batch["cu_seq_lens_q"]
    assert batch["max_length_q"] == batch["max_length_k"] == 6 and isinstance(batch["max_length_q"], int)
    assert "attention_mask" not in batch
    plain = collate_packed(rows, pad_id=0)
    assert not set(VARLEN_KEYS) & set(plain) and torch.equal(plain["position_ids"], batch["position_ids"])
    assert set(VARLEN_KEYS) <= set(model_inputs(batch))  # the objectives forward them to the model
    # Packing real examples: every boundary is a sample start.
    ex = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (7, 3, 9, 4, 6, 2)]
    packed = pack_examples(ex, 12)
    b = collate_packed(packed, pad_id=0, varlen=True)
    width = b["input_ids"].shape[1]
    starts = [i * width + s for i, r in enumerate(packed) for s in torch.tensor([0] + r["lengths"][:-1]).cumsum(0).tolist()]
    assert b["cu_seq_lens_q"].tolist() == starts + [len(packed) * width]


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                     cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """What flash_attn_varlen_func computes, in plain PyTorch: causal attention within each
    [cu[i], cu[i+1]) of the flattened B*T tokens. Fails when the boundaries did not arrive."""
    assert attention_mask is None, "a packed batch must reach attention without a mask"
    assert cu_seq_lens_q is not None and cu_seq_lens_k is not None, "the varlen boundaries did not reach attention"
    assert isinstance(max_length_q, int) and max_length_q == int(cu_seq_lens_q.diff().max())
    varlen_reference.calls += 1
    b, nh, t, hs = query.shape  # (B, nh, T, hs)
    rep = nh // key.shape[1]
    q = query.transpose(1, 2).reshape(b * t, nh, hs)  # (B*T, nh, hs)
    k = key.repeat_interleave(rep, dim=1).transpose(1, 2).reshape(b * t, nh, hs)
    v = value.repeat_interleave(rep, dim=1).transpose(1, 2).reshape(b * t, nh, hs)
    out = torch.empty_like(q)
    bounds = cu_seq_lens_q.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        o = torch.nn.functional.scaled_dot_product_attention(  # (nh, n, hs)
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True, scale=scaling)
        out[s:e] = o.transpose(0, 1)
    return out.reshape(b, t, nh, hs), None  # (B, T, nh, hs) as transformers' kernels return it


varlen_reference.calls = 0


@pytest.fixture
def varlen_kernel():
    """``varlen_reference`` registered with transformers as an attention kernel (as flash-attn's
    are); custom kernels get no mask, as flash gets none for packed rows."""
    from transformers import AttentionInterface

    AttentionInterface.register("varlen_reference", varlen_reference)
    varlen_reference.calls = 0
    return attention.AttentionChoice("varlen_reference", "CPU stand-in for flash_attn_varlen_func", varlen=True)


@pytest.mark.parametrize("mode", ["position_ids", "varlen"])
def test_packed_rows_give_each_sample_its_own_logits(mode, varlen_kernel, monkeypatch):
    """Two packed rows (B > 1, padded) through the plan's model loading and collate: sdpa with the
    mask from position_ids, and the varlen path (boundaries per batch) on its CPU stand-in."""
    from mmtune.config import ModelConfig
    from mmtune.models.loading import load_model

    if mode == "varlen":
        monkeypatch.setattr(fast_path, "choose_attention", lambda *a, **k: varlen_kernel)
    plan = plan_speed("cpu")
    assert plan.packing == mode
    model = load_model(ModelConfig(path="builtin:tiny", dtype="float32"), None, training=False, **plan.load_kwargs())
    assert model.config._attn_implementation == plan.attention.implementation
    rows = _rows([[5, 3, 7], [6, 4]])
    batch = causal_collate(plan, pad_id=0)(rows)
    with torch.no_grad():
        packed = model(**model_inputs(batch), use_cache=False).logits  # (2, 15, V)
        for r, row in enumerate(rows):
            start = 0
            for n in row["lengths"]:
                ids = torch.tensor(row["input_ids"][start:start + n])[None]  # (1, n)
                alone = load_alone(model, ids)
                torch.testing.assert_close(packed[r, start:start + n], alone[0], atol=1e-5, rtol=1e-5)
                start += n
        if mode == "varlen":
            assert varlen_reference.calls == model.config.num_hidden_layers  # every layer got the boundaries
            # Without the boundaries the kernel cannot isolate the samples (flash's own fallback would
            # run causal attention over each whole row): the stand-in refuses, so the test can fail.
            with pytest.raises(AssertionError, match="did not reach attention"):
                model(**model_inputs(collate_packed(rows, pad_id=0)), use_cache=False)


def load_alone(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of one sample run by itself, with the reference sdpa kernel."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        return model(input_ids=ids, use_cache=False).logits  # (1, n, V)
    finally:
        model.set_attn_implementation(impl)


def test_mmtune_train_on_the_varlen_path_trains_like_sdpa(tmp_path, varlen_kernel, monkeypatch):
    """The whole varlen path of `mmtune train` (plan -> from_pretrained -> collate -> fused
    objective -> every attention layer), flash_attn_varlen_func replaced by its CPU stand-in:
    two packed rows per batch give the losses of sdpa with the mask from position_ids."""
    from mmtune.config import load_recipe
    from mmtune.workflows.run import run_recipe

    overrides = ["model.path=builtin:tiny", "adapter.type=lora", "adapter.dropout=0.0", "data.max_length=96",
                 "train.max_steps=3", "train.batch_size=2", "train.progress=false", "train.eval_prompts=[]",
                 "data.eval_sources=[]", "train.tensorboard=false", "train.eval_every=null",
                 "train.save_every=null", "train.fused_loss=true", "train.lr=1e-2"]
    quiet = lambda *a, **k: None  # noqa: E731
    sdpa = run_recipe(load_recipe("quickstart", overrides + [f"train.output_dir={tmp_path / 'sdpa'}"]), log=quiet)
    monkeypatch.setattr(fast_path, "choose_attention", lambda *a, **k: varlen_kernel)
    varlen = run_recipe(load_recipe("quickstart", overrides + [f"train.output_dir={tmp_path / 'varlen'}"]), log=quiet)
    plan, trainer = varlen["speed_plan"], varlen["trainer"]
    assert sdpa["speed_plan"].packing == "position_ids" and plan.packing == "varlen" and plan.loss == "chunked"
    assert trainer.model.get_base_model().config._attn_implementation == "varlen_reference"
    assert set(VARLEN_KEYS) <= set(trainer.collate_fn(trainer.train_rows[:2]))
    layers = trainer.model.get_base_model().config.num_hidden_layers
    assert varlen_reference.calls == 3 * layers  # 3 steps x every layer, each with the boundaries
    assert len(varlen["losses"]) == len(sdpa["losses"]) == 3
    for a, b in zip(varlen["losses"], sdpa["losses"]):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b))
    assert varlen["losses"][-1] != varlen["losses"][0]  # it trained
