"""The web UI's pieces without a browser: training in a background thread (progress, clean
stop), report directories, and the chat rendering helpers."""

from __future__ import annotations

import json

import pytest

from mmtune.config import validate_recipe
from mmtune.inference.models import TextChatModel
from mmtune.inference.turns import GenerationSettings, Turn
from mmtune.serve.reports import find_reports, read_report, report_label
from mmtune.serve.train_job import TrainJob, total_steps
from mmtune.serve.web import (
    chat_messages,
    loss_frames,
    parse_overrides,
    progress_html,
    reply_to,
    train_recipes,
)


def tiny_recipe(out, **train) -> dict:
    return {
        "objective": "sft",
        "model": {"path": "builtin:tiny"},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"sources": [{"path": "builtin:instruct", "max_records": 40}],
                 "eval_sources": [{"path": "builtin:instruct-eval", "max_records": 6}],
                 "max_length": 128, "packing": True, "cache_dir": None},
        "train": {"output_dir": str(out), "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 0,
                  "eval_every": 1, "eval_prompts": ["What is 3 + 4?"], "max_new_tokens": 4,
                  "tensorboard": False, **train},
    }


def test_stop_ends_the_run_cleanly_with_a_checkpoint(tmp_path):
    """Stop after the first logged step: the run leaves the loop, saves a checkpoint and final
    weights; the step total read back from metrics.jsonl equals the Trainer's."""
    recipe = validate_recipe(tiny_recipe(tmp_path / "run", epochs=50))
    job = TrainJob(recipe, source="tiny").start()
    for _ in range(600):  # bounded: 60 s
        if any("loss" in r for r in job.metrics()) or not job.alive:
            break
        job.join(0.1)
    assert job.stop(), job.error
    assert job.state == "stopping" and not job.stop()
    assert job.join(120), "the run did not stop"
    assert job.state == "stopped", job.error
    rows = job.metrics()
    step = job.result["steps"]
    assert 1 <= step < job.total
    assert total_steps(recipe, rows) == job.total  # parity with Trainer.total_steps
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:08d}").is_dir()
    assert job.chat_dir() == tmp_path / "run" / "final" and (tmp_path / "run" / "final" / "meta.json").is_file()
    p = job.progress()
    assert (p.state, p.step, p.total) == ("stopped", step, job.total) and p.loss is not None
    assert any(s[1] == "What is 3 + 4?" for s in job.samples())
    assert any("stop requested" in line for line in job.lines)
    html = progress_html(job)
    assert f"step {step} / {job.total}" in html and "stopped" in html
    train_df, eval_df = loss_frames(rows)
    assert str(train_df["loss"].dtype) == "float64" and len(train_df) == len([r for r in rows if "loss" in r])
    assert eval_df is not None and list(eval_df.columns) == ["step", "eval loss"]


def test_total_steps_from_max_steps_and_before_any_row(tmp_path):
    r = validate_recipe(tiny_recipe(tmp_path, max_steps=7))
    assert total_steps(r, []) == 7
    r = validate_recipe(tiny_recipe(tmp_path, epochs=3))
    assert total_steps(r, []) is None
    # 10 micro-batches per epoch, grad_accum 2: step 1 is at epoch 0.2; 3 epochs -> 15 steps
    assert total_steps(r, [{"step": 1, "loss": 1.0, "epoch": 0.2}]) == 15


def test_failed_run_reports_the_error(tmp_path):
    recipe = validate_recipe(tiny_recipe(tmp_path / "run", max_steps=2))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")  # an old run: needs resume or overwrite
    job = TrainJob(recipe).start()
    assert job.join(60)
    assert job.state == "failed" and "--overwrite" in job.error and job.chat_dir() is None


def write_demo_report(out):
    from PIL import Image

    out.mkdir(parents=True)
    Image.new("RGB", (40, 20), (10, 120, 200)).save(out / "loss_curves.png")
    Image.new("RGB", (20, 20), (0, 0, 0)).save(out / "extra.png")
    (out / "report.md").write_text("# mmtune demo report\n\n| task | after |\n|---|---|\n| add | 80% |\n\n"
                                   "![loss curves](loss_curves.png)\n\n![gone](missing.png)\n")
    (out / "scores.json").write_text(json.dumps({"after LoRA SFT": {"exact_match": 0.8}}))


def test_reports_are_found_and_their_figures_inlined(tmp_path, write_continual_report):
    runs = tmp_path / "runs"
    write_continual_report(runs / "cl" / "replay")
    write_demo_report(runs / "demo")
    (runs / "x" / "checkpoints" / "step-1").mkdir(parents=True)
    (runs / "x" / "checkpoints" / "step-1" / "report.md").write_text("# not a report\n")
    found = find_reports(runs)
    assert sorted(found) == sorted([runs / "cl" / "replay", runs / "demo"])
    assert found[0] == runs / "demo"  # newest first
    assert find_reports(tmp_path / "absent") == []

    cl = read_report(runs / "cl" / "replay")
    assert cl.kind == "continual" and cl.title.startswith("Continual learning report: replay")
    assert cl.markdown.count("](data:image/png;base64,") == 2 and "](accuracy_matrix.png)" not in cl.markdown
    assert cl.unlinked == [] and {p.name for p in cl.images} == {"accuracy_matrix.png", "task_curves.png"}
    assert cl.metrics["metrics"]["acc"] == pytest.approx((0.45 + 0.70 + 0.90) / 3)

    demo = read_report(runs / "demo")
    assert demo.kind == "demo" and demo.title == "mmtune demo report"
    assert "](data:image/png;base64," in demo.markdown and "missing.png is missing" in demo.markdown
    assert [p.name for p in demo.unlinked] == ["extra.png"]
    assert demo.metrics == {"after LoRA SFT": {"exact_match": 0.8}}
    assert report_label(runs / "demo", runs) == "demo  (demo)"


def test_chat_rendering_and_overrides():
    hist = [{"role": "user", "text": "What is this?", "images": ["/tmp/a.png"], "audios": ["/tmp/b.wav"]},
            {"role": "assistant", "text": "A cat.", "notes": ["no vision encoder"]}]
    assert chat_messages(hist) == [
        {"role": "user", "content": {"path": "/tmp/a.png"}}, {"role": "user", "content": {"path": "/tmp/b.wav"}},
        {"role": "user", "content": "What is this?"},
        {"role": "assistant", "content": "> ℹ️ no vision encoder\n\nA cat."}]
    assert parse_overrides("train.max_steps=5  train.lr=1e-4\n# comment\n\ndata.packing=false # why\n") == [
        "train.max_steps=5", "train.lr=1e-4", "data.packing=false"]
    names = train_recipes()
    assert "quickstart" in names and "continual-digits" not in names


def test_old_turns_are_dropped_to_fit(text_backend):
    b = text_backend
    small = TextChatModel(b.model, b.tokenizer, b.template, "tiny", max_prompt_tokens=60)
    hist = []
    for i in range(6):
        hist += [{"role": "user", "text": f"question number {i} about words"},
                 {"role": "assistant", "text": f"answer number {i}"}]
    hist.append({"role": "user", "text": "last question"})
    reply = reply_to(small, hist, "Be brief.", GenerationSettings(2, 0.0))
    reply.text()
    dropped = reply.dropped
    assert f"The {dropped} oldest messages were left out" in reply.notes[-1]
    turns = [Turn("system", "Be brief.")] + [Turn(h["role"], h["text"]) for h in hist]
    assert dropped % 2 == 0 and dropped > 0
    kept = [turns[0]] + turns[1 + dropped:]
    assert reply.prompt_tokens == small.count_prompt_tokens(kept) <= 60
    assert small.count_prompt_tokens([turns[0]] + turns[1 + dropped - 2:]) > 60  # dropped no more than needed
