"""mmtune on a real pretrained model: builtin:smollm2-135m-instruct (SmolLM2-135M-Instruct,
134.5M parameters, 30 layers), all slow (a forward of a short sequence is ~1 s on one thread).

Packing tolerance (issue 13 item 7). Packed rows and the same samples run alone differ in fp32 by
4.0e-5..5.8e-5 (max |logit| ~39), i.e. ~1.5e-6 of the logits' scale, also for the first sample of a
row (no boundary involved), while the same sample put in
an ordinary padded batch of two, no packing at all, differs by 3.3e-5: the difference is the
accumulation order of fp32 matmul / attention kernels, which depends on the batch's shape, summed
over 30 layers whose activations reach the hundreds. In fp64 packed == alone to 3.6e-14..6.4e-14
(plain and LoRA-wrapped). The one fp64 effect at the 1e-5 scale is RoPE: transformers computes the
rotary angles in fp32 even in an fp64 model (``position_ids.float() * inv_freq.float()``), so a
sample at other absolute positions (shifted by 37: 1.75e-5) differs even in fp64; with fp64 angles
the shift changes nothing (0.0). Packing restarts positions at 0 per sample, so each sample gets
bit-identical cos/sin; an fp64 difference of that size means a sample's positions did not restart.
Ruled out: SDPA's paths (fp64 is_causal / boolean block mask / math agree with an exact softmax to
<= 7.6e-14 for rows up to 1024 tokens), LoRA (fp64 LoRA-wrapped packed == alone to 6.0e-14).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmtune.config import AdapterConfig, load_recipe
from mmtune.data.packing import collate_packed, collate_padded, pack_examples
from mmtune.data.templates import get_template
from mmtune.export import merge_adapter
from mmtune.models.adapters import apply_adapter
from mmtune.models.loading import resolve_model_path
from mmtune.train.objectives import CausalLMObjective
from mmtune.train.run import run_recipe

pytestmark = pytest.mark.slow

NAME = "builtin:smollm2-135m-instruct"
QUESTIONS = ["Rewrite the date March 3, 2021 as an ISO date.", "What is the capital of France?",
             "Name three colours.", "Explain packing of sequences in a few words."]
ANSWERS = ["2021-03-03", "Paris.", "Red, green and blue.", "Several samples share one row."]
#: fp32 packed-vs-alone (and merged-vs-adapter) logit difference over max |logit|: measured 1.46e-6
#: (packing) and 2.0e-6 (LoRA merge: W + s*BA rounded once vs two matmuls), see the module docstring.
FP32_REL_TOL = 5e-6


@pytest.fixture(scope="module")
def smol():
    path = resolve_model_path(NAME)
    return path, AutoTokenizer.from_pretrained(path)


def _model(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _examples(tokenizer):
    template = get_template("auto", tokenizer)
    out = []
    for q, a in zip(QUESTIONS, ANSWERS):
        ids, labels = template.encode([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        out.append({"input_ids": ids, "labels": labels})
    return out


def _packed_vs_alone(model, examples):
    """(worst |packed - alone| logit difference, max |logit|, packed batch)."""
    rows = pack_examples(examples, 128)
    assert max(len(r["lengths"]) for r in rows) >= 2
    batch = collate_packed(rows, pad_id=0)
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for b, row in enumerate(rows):
            start = 0
            for i, n in zip(row["indices"], row["lengths"]):
                alone = model(input_ids=torch.tensor([examples[i]["input_ids"]]), use_cache=False).logits[0]
                worst = max(worst, (packed[b, start:start + n] - alone).abs().max().item())
                scale = max(scale, alone.abs().max().item())
                start += n
    return worst, scale, batch


def test_packed_equals_unpacked_fp32_loss_and_logits(smol):
    path, tokenizer = smol
    model = _model(path)
    examples = _examples(tokenizer)
    worst, scale, batch = _packed_vs_alone(model, examples)
    assert worst <= FP32_REL_TOL * scale, (worst, scale)
    objective = CausalLMObjective()
    with torch.no_grad():
        packed = objective(model, batch)
        per_sample = [objective(model, collate_padded([e], 0)) for e in examples]
    assert int(packed.count) == sum(int(p.count) for p in per_sample)
    total = sum(p.loss_sum.item() for p in per_sample)
    assert abs(packed.loss_sum.item() - total) <= 1e-6 * total


def test_packed_equals_unpacked_fp64_and_why_positions_must_restart(smol):
    """fp64 removes the accumulation-order noise: packed == alone to ~1e-13 (LoRA-wrapped too). A
    shift of a sample's absolute positions still changes fp64 logits at the 1e-5 scale, through the
    fp32 rotary angles: the mechanism of an fp64 difference, and why packing restarts positions."""
    path, tokenizer = smol
    model = apply_adapter(_model(path, torch.float64), AdapterConfig(r=8, alpha=16, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    model.eval()
    examples = _examples(tokenizer)[:3]
    worst, scale, _ = _packed_vs_alone(model, examples)
    assert worst <= 1e-12 * scale, worst
    ids = torch.tensor([examples[0]["input_ids"]])
    n = ids.shape[1]
    with torch.no_grad():
        at0 = model(input_ids=ids, position_ids=torch.arange(n)[None], use_cache=False).logits
        shifted = model(input_ids=ids, position_ids=torch.arange(37, 37 + n)[None], use_cache=False).logits
    assert (shifted - at0).abs().max().item() > 1e-7  # fp32 RoPE angles, not fp64 arithmetic


def test_lora_merge_equals_adapter_logits(smol, tmp_path):
    path, tokenizer = smol
    model = apply_adapter(_model(path), AdapterConfig(r=8, alpha=16, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([_examples(tokenizer)[1]["input_ids"]])
    with torch.no_grad():
        adapter_logits = model(input_ids=ids).logits
    out = merge_adapter(path, tmp_path / "adapter", tmp_path / "merged")
    merged = _model(out)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    scale = adapter_logits.abs().max().item()
    assert (merged_logits - adapter_logits).abs().max().item() <= FP32_REL_TOL * scale
    with torch.no_grad():
        base_logits = _model(path)(input_ids=ids).logits
    assert (base_logits - adapter_logits).abs().max().item() > 1e-2  # the adapter matters


@pytest.mark.parametrize("system", [None, "You are a terse assistant."])
def test_template_parity_with_apply_chat_template(smol, system):
    """mmtune's data path renders and tokenizes exactly as ``apply_chat_template`` (SmolLM2's
    template adds its default system prompt when there is none) and supervises the answer plus
    ``<|im_end|>``."""
    _, tokenizer = smol
    template = get_template("auto", tokenizer)
    for q, a in zip(QUESTIONS, ANSWERS):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": q}, {"role": "assistant", "content": a}]
        assert template.render(messages) == tokenizer.apply_chat_template(messages, tokenize=False)
        ids, labels = template.encode(messages)
        expected = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
        assert ids == expected["input_ids"]
        supervised = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != -100])
        assert supervised.startswith(a) and supervised.rstrip("\n").endswith("<|im_end|>")
        prompt = template.prompt_text(messages[:-1])
        assert prompt == tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if system is None:
        assert "You are a helpful AI assistant named SmolLM" in template.render(messages)


def _data(tmp_path):
    """Two fixed chat records, so every step sees the same batch and the loss must fall."""
    path = tmp_path / "two.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in zip(QUESTIONS[:2], ANSWERS[:2])))
    return path


def _overrides(tmp_path, out: str, steps: int):
    return [f"model.path={NAME}", "adapter.type=lora", "adapter.dropout=0.0", "data.max_length=96",
            f"data.sources.0.path={_data(tmp_path)}", "data.eval_sources=[]", f"train.max_steps={steps}",
            "train.batch_size=2", "train.lr=1e-3", "train.warmup_steps=0", "train.save_every=2",
            "train.progress=false", "train.eval_prompts=[]", "train.tensorboard=false",
            f"train.output_dir={tmp_path / out}"]


def quiet(*a, **k):
    pass


def test_qlora_nf4_trains_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    res = run_recipe(load_recipe("quickstart", _overrides(tmp_path, "q", 4) + ["model.quantization=nf4"]), log=quiet)
    losses = res["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0] * 0.9, losses


class Crash(Exception):
    pass


def test_kill_and_resume_gives_identical_losses(tmp_path):
    full = run_recipe(load_recipe("quickstart", _overrides(tmp_path, "a", 4)), log=quiet)
    recipe = load_recipe("quickstart", _overrides(tmp_path, "b", 4))
    calls = {"n": 0}

    def crash_after_3():
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash  # as if the process died during step 4
        return False

    with pytest.raises(Crash):
        run_recipe(recipe, log=quiet, stop_flag=crash_after_3)
    resumed = run_recipe(recipe, resume=True, log=quiet)
    assert len(resumed["losses"]) == len(full["losses"]) == 4
    assert resumed["losses"] == full["losses"]  # bit-identical on one thread
    assert full["losses"][-1] < full["losses"][0]


def test_two_processes_train(tmp_path):
    cmd = [sys.executable, "-m", "mmtune.cli", "train", "quickstart", *_overrides(tmp_path, "ddp", 2), "--nproc", "2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    from mmtune.train.metrics_log import read_metrics

    losses = [r["loss"] for r in read_metrics(tmp_path / "ddp") if "loss" in r]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses)
    assert (tmp_path / "ddp" / "final" / "meta.json").is_file()
