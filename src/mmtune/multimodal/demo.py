"""`mmtune demo --multimodal`: give the tiny built-in LLM eyes and ears, stage by stage, on a CPU.

1. the tiny Llama-style LM (:func:`mmtune.models.tiny.ensure_tiny`) gets a short full
   fine-tune on the built-in instruction tasks, so that it has some text ability to keep;
2. built-in data is drawn in code: shapes images with captions and colour / count / position
   questions, OCR of words and numbers (square 64 px and 4:1 wide images cut into several
   tiles), and spoken digit strings from the procedural speech engine;
3. a tiny SigLIP tower (random init) with Phi-4 tiling and the ``phi4_avgpool`` projector, a
   tiny Conformer with an MLP projector, and a vision and a speech LoRA are composed with the
   LM and trained with Phi-4-multimodal's staged recipe (REFERENCE.md section 1):
   vision (1) projector alignment on captions, (2) encoder + projector, (3) LoRA_V SFT with
   encoder + projector; speech (4) encoder + projector with the decoder frozen, (5) projector
   + LoRA_A SFT;
4. every task is scored before and after each stage, and a Markdown report is written.

Scores (all on held-out draws):

- caption: token accuracy, the share of caption tokens (and the end-of-turn token) that the
  model predicts correctly by argmax given the reference prefix (teacher forcing); captions are
  long, exact match would hide progress;
- VQA: exact match of the greedy answer (colour / count / position; chance 1/5, 1/4, 1/4);
- OCR: token accuracy and exact match, square (one word or number) and wide (3-4 of them);
- ASR: exact match of the greedy transcript ("3 7 1") and token accuracy;
- text: exact match on the built-in held-out instruction tasks
  (:func:`mmtune.evaluation.exact_match`), through the router's text route (the base model):
  the multimodal stages cannot change it;
- control: the final model with every image / clip swapped for another sample's (same task):
  what the answer format and priors alone score. The gap to it is what the model reads from
  the media.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from ..config import validate_recipe

#: Steps and sizes: the full demo (about 10 minutes on 2 CPU cores) and ``--quick`` (a smoke run).
FULL = dict(text_steps=300, steps=(150, 250, 400, 150, 300), n_train=(400, 400, 300, 200, 500),
            n_eval=(40, 90, 40, 30, 60, 30))
QUICK = dict(text_steps=4, steps=(3, 3, 3, 3, 3), n_train=(16, 16, 8, 8, 16), n_eval=(4, 6, 4, 4, 4, 6))

TASK_SOURCES = {"caption": "shapes-caption", "vqa": "shapes-vqa", "ocr": "ocr", "ocr_wide": "ocr-wide",
                "asr": "spoken-digits"}
VQA_CHANCE = {"color": 1 / 5, "count": 1 / 4, "position": 1 / 4}


def _text_base(out: Path, steps: int, log) -> Path:
    """The tiny LM after a short full fine-tune on builtin:instruct (exported HF directory)."""
    from ..export import export_checkpoint
    from ..models.tiny import ensure_tiny
    from ..train.run import run_recipe

    target = out / "text-base"
    if (target / "config.json").is_file():
        return target
    recipe = validate_recipe({
        "objective": "sft", "model": {"path": str(ensure_tiny())}, "adapter": {"type": "none"},
        "data": {"sources": [{"path": "builtin:instruct"}], "max_length": 128, "packing": True},
        "train": {"output_dir": str(out / "text-sft"), "max_steps": steps, "lr": 3e-3, "batch_size": 8,
                  "warmup_steps": min(10, steps), "save_every": 10_000, "tensorboard": False, "progress": False,
                  "log_every": 50}})
    run_recipe(recipe, overwrite=True, log=lambda *_: None)
    return export_checkpoint(out / "text-sft" / "final", target, overwrite=True)


def _recipe(out: Path, lm_dir: Path, data: dict[str, Path], steps: tuple[int, ...]) -> dict:
    def src(*names):
        return [{"path": str(data[n])} for n in names]

    s1, s2, s3, s4, s5 = steps
    return {
        "objective": "sft",
        "model": {"path": str(lm_dir), "dtype": "float32"},
        "data": {"template": "auto", "max_length": 256, "packing": True},
        "train": {"output_dir": str(out / "run"), "batch_size": 4, "lr": 1e-3, "warmup_steps": 10,
                  "weight_decay": 0.0, "save_every": 10_000, "keep_last": 1, "tensorboard": False,
                  "progress": False, "log_every": 25},
        "multimodal": {
            "vision": {"path": "builtin:tiny-siglip", "tiling": "phi4", "max_crops": 4, "projector": "phi4_avgpool"},
            "audio": {"path": "builtin:tiny-conformer"},
            "vision_speech": False,
            "adapters": [{"name": "vision", "r": 32, "alpha": 64, "dropout": 0.0, "targets": "all-linear"},
                         {"name": "speech", "r": 32, "alpha": 64, "dropout": 0.01, "targets": "all-linear"}],
            "stages": [
                {"name": "vision-align", "sources": src("caption"), "max_steps": s1,
                 "trainable": {"vision_projector": "full"}, "lr": {"vision_projector": 2e-3}},
                {"name": "vision-joint", "sources": src("caption", "vqa", "ocr", "ocr_wide"), "max_steps": s2,
                 "trainable": {"vision_encoder": "full", "vision_projector": "full"},
                 "lr": {"vision_encoder": 1e-3, "vision_projector": 1e-3}},
                {"name": "vision-sft", "sources": src("caption", "vqa", "ocr", "ocr_wide"), "max_steps": s3,
                 "trainable": {"vision_encoder": "full", "vision_projector": "full", "llm": "lora"},
                 "adapter": "vision", "lr": {"vision_encoder": 5e-4, "vision_projector": 1e-3, "llm": 2e-3}},
                {"name": "speech-align", "sources": src("asr"), "max_steps": s4,
                 "trainable": {"audio_encoder": "full", "audio_projector": "full"},
                 "lr": {"audio_encoder": 2e-3, "audio_projector": 2e-3}},
                {"name": "speech-sft", "sources": src("asr"), "max_steps": s5,
                 "trainable": {"audio_projector": "full", "llm": "lora"}, "adapter": "speech",
                 "lr": {"audio_projector": 1e-3, "llm": 2e-3}},
            ],
        },
    }


# ---------------------------------------------------------------------------------------------
# Evaluation


def load_eval_items(jsonl: Path, model, cache, task: str) -> list[dict]:
    """Normalised records of ``jsonl`` with their processed media and reference answer."""
    from .data import normalize_mm_record

    items = []
    for line in jsonl.read_text().splitlines():
        rec = json.loads(line)
        sample = normalize_mm_record(rec, "auto", jsonl.parent)
        images = [cache.get(m) for m in sample["images"]]
        audios = [cache.get(m) for m in sample["audios"]]
        items.append({"task": task, "sample": sample, "images": images, "audios": audios,
                      "reference": sample["messages"][-1]["content"], "qtype": _qtype(sample)})
    return items


def _qtype(sample: dict) -> str:
    q = sample["messages"][0]["content"]
    return "color" if "color" in q else "count" if "How many" in q else "position" if "Where" in q else ""


def shuffled(items: list[dict], seed: int = 0) -> list[dict]:
    """The same prompts with every sample's media replaced by another sample's (a derangement)."""
    n = len(items)
    order = list(range(n))
    rng = random.Random(seed)
    rng.shuffle(order)
    perm = order[1:] + order[:1]  # a cycle through a random order: nobody keeps its own media
    src = {order[i]: perm[i] for i in range(n)}
    return [{**it, "images": items[src[i]]["images"], "audios": items[src[i]]["audios"]} for i, it in enumerate(items)]


def exact_match_items(model, template, items: list[dict], max_new_tokens: int = 16) -> float:
    from ..evaluation import normalize_answer
    from .data import prompt_ids

    if not items:
        return 0.0
    hits = 0
    stops = template.stop_token_ids
    for it in items:
        ids = prompt_ids(model, template, it["sample"]["messages"][:-1], it["images"], it["audios"])
        out = list(model.stream_ids(ids, it["images"], it["audios"], max_new_tokens, stops))
        answer = model.tokenizer.decode(out, skip_special_tokens=True)
        hits += normalize_answer(answer) == normalize_answer(it["reference"])
    return hits / len(items)


def token_accuracy_items(model, template, items: list[dict], batch_size: int = 16) -> float:
    from .data import LengthPolicy, collate_mm, encode_mm_sample
    from .objective import token_accuracy

    policy = LengthPolicy(max_length=10_000, truncation=False)
    examples = [encode_mm_sample(it["sample"], it["images"], it["audios"], model, template, policy) for it in items]
    pad = model.tokenizer.pad_token_id
    correct = total = 0
    for i in range(0, len(examples), batch_size):
        c, t = token_accuracy(model, collate_mm(examples[i:i + batch_size], pad))
        correct, total = correct + c, total + t
    return correct / max(total, 1)


@torch.no_grad()
def evaluate_tasks(model, template, items: dict[str, list[dict]], text_records: list[dict]) -> dict[str, float]:
    """Every score of the report for ``model`` (see the module docstring)."""
    from ..evaluation import exact_match

    model.eval()
    s: dict[str, float] = {}
    s["caption/token_acc"] = token_accuracy_items(model, template, items["caption"])
    for q in VQA_CHANCE:
        sub = [it for it in items["vqa"] if it["qtype"] == q]
        s[f"vqa-{q}/exact_match"] = exact_match_items(model, template, sub, 4)
    s["vqa/exact_match"] = sum(s[f"vqa-{q}/exact_match"] * sum(it["qtype"] == q for it in items["vqa"])
                               for q in VQA_CHANCE) / max(len(items["vqa"]), 1)
    for task in ("ocr", "ocr_wide"):
        s[f"{task}/token_acc"] = token_accuracy_items(model, template, items[task])
        s[f"{task}/exact_match"] = exact_match_items(model, template, items[task], 24)
    s["asr/exact_match"] = exact_match_items(model, template, items["asr"], 12)
    s["asr/token_acc"] = token_accuracy_items(model, template, items["asr"])
    if text_records:
        route = model.router.route("text", n_samples=0)
        with model.router.activate(model.language_model, route):
            s["text/exact_match"] = exact_match(model.language_model, model.tokenizer, template, text_records,
                                                16)["exact_match"]
    model.train()
    return s


ROWS = [("caption/token_acc", "caption (token acc.)"), ("vqa-color/exact_match", "VQA colour (EM)"),
        ("vqa-count/exact_match", "VQA count (EM)"), ("vqa-position/exact_match", "VQA position (EM)"),
        ("vqa/exact_match", "VQA all (EM)"), ("ocr/token_acc", "OCR square (token acc.)"),
        ("ocr/exact_match", "OCR square (EM)"), ("ocr_wide/token_acc", "OCR wide (token acc.)"),
        ("ocr_wide/exact_match", "OCR wide (EM)"), ("asr/exact_match", "ASR digits (EM)"),
        ("asr/token_acc", "ASR digits (token acc.)"), ("text/exact_match", "text tasks (EM, base route)")]


def _table(scores: dict[str, dict], control: dict[str, float], chance: dict[str, float]) -> str:
    cols = list(scores)
    lines = ["| task (metric) | " + " | ".join(cols) + " | control: media shuffled | chance |",
             "|---" * (len(cols) + 3) + "|"]
    for key, label in ROWS:
        if not any(key in scores[c] for c in cols):
            continue
        vals = " | ".join(f"{scores[c].get(key, float('nan')):.1%}" for c in cols)
        ctrl = f"{control[key]:.1%}" if key in control else "-"
        ch = f"{chance[key]:.1%}" if key in chance else "-"
        lines.append(f"| {label} | {vals} | {ctrl} | {ch} |")
    return "\n".join(lines)


def _chance(items: dict[str, list[dict]]) -> dict[str, float]:
    out = {f"vqa-{q}/exact_match": c for q, c in VQA_CHANCE.items()}
    vqa = items["vqa"]
    out["vqa/exact_match"] = sum(VQA_CHANCE[it["qtype"]] for it in vqa) / max(len(vqa), 1)
    asr = items["asr"]
    out["asr/exact_match"] = sum(10.0 ** -len(it["reference"].split()) for it in asr) / max(len(asr), 1)
    return out


def run_multimodal_demo(output: str = "runs/demo-multimodal", quick: bool = False, log=print) -> dict:
    """Run the demo (module docstring) into ``output``; returns the scores per stage."""
    from ..data.builtin import TASKS, builtin_records
    from ..data.templates import get_template
    from .data import MediaCache, builtin_source
    from .run import run_multimodal_recipe

    t0 = time.time()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = QUICK if quick else FULL
    log(f"[1/4] text base: the tiny LM, {cfg['text_steps']} steps of full SFT on the built-in instruction tasks")
    lm_dir = _text_base(out, cfg["text_steps"], log)

    log("[2/4] built-in data: shapes (caption, VQA), OCR (square, wide), spoken digits")
    data_root = out / "data"
    n_cap, n_vqa, n_ocr, n_wide, n_asr = cfg["n_train"]
    train = {"caption": builtin_source("shapes-caption", n_cap, 0, data_root),
             "vqa": builtin_source("shapes-vqa", n_vqa, 0, data_root),
             "ocr": builtin_source("ocr", n_ocr, 0, data_root),
             "ocr_wide": builtin_source("ocr-wide", n_wide, 0, data_root),
             "asr": builtin_source("spoken-digits", n_asr, 0, data_root)}
    n_eval = dict(zip(["caption", "vqa", "ocr", "ocr_wide", "asr", "text"], cfg["n_eval"]))
    evals = {task: builtin_source(f"{name}-eval", n_eval[task], 0, data_root) for task, name in TASK_SOURCES.items()}
    text_records = builtin_records("instruct-eval")
    per_task = max(1, n_eval["text"] // len(TASKS))
    text_records = [r for t in TASKS for r in [x for x in text_records if x["task"] == t][:per_task]]

    recipe = validate_recipe(_recipe(out, lm_dir, train, cfg["steps"]))
    scores: dict[str, dict] = {}
    state: dict = {}

    def on_stage_end(name, result, model):
        if "items" not in state:
            state["template"] = get_template(recipe.data.template, model.tokenizer)
            cache = MediaCache(model)
            state["items"] = {task: load_eval_items(path, model, cache, task) for task, path in evals.items()}
        t = time.time()
        scores[name] = evaluate_tasks(model, state["template"], state["items"], text_records)
        log(f"  scores {name} ({time.time() - t:.0f} s): "
            + ", ".join(f"{k} {v:.0%}" for k, v in scores[name].items() if "-" not in k.split("/")[0]))

    log("[3/4] composed model: tiny SigLIP + phi4_avgpool, tiny Conformer + MLP, LoRA_V and LoRA_A; 5 stages")
    result = run_multimodal_recipe(recipe, overwrite=True, log=log, on_stage_end=on_stage_end,
                                   cache_root=out / "encoders")
    model = result["model"]
    items = state["items"]
    control_items = {task: shuffled(v, seed=1) for task, v in items.items()}
    control = evaluate_tasks(model, state["template"], control_items, [])

    log("[4/4] report")
    minutes = (time.time() - t0) / 60
    table = _table(scores, control, _chance(items))
    stages = "\n".join(f"- **{s['stage']}**: {s['steps']} steps, {s['trainable']:,} trainable parameters, "
                       f"{s['examples']} examples, final loss {s['final_loss']:.3f}" for s in result["stages"])
    report = (
        "# mmtune multimodal demo report\n\n"
        "A tiny Llama-style LM (after a short text SFT) composed with a tiny SigLIP tower (Phi-4 tiling, "
        "phi4_avgpool projector) and a tiny Conformer (MLP projector), with a vision and a speech LoRA picked by "
        "the modality router (text -> base model). Stages follow Phi-4-multimodal.\n\n"
        f"{stages}\n\n"
        "Scores on held-out draws after each stage (`before`: the composed model before training). EM = exact "
        "match of the greedy answer; token acc. = teacher-forced next-token accuracy on the answer tokens. "
        "`control`: the final model with each sample's image/audio swapped for another sample's, i.e. what "
        "priors alone score. The text row runs through the router's text route (adapters off): the multimodal "
        "stages leave it unchanged.\n\n"
        f"{table}\n\nTotal time: {minutes:.1f} min.\n\nChat with the result:\n\n"
        f"    mmtune chat {result['final_dir']} --image IMAGE.png\n")
    (out / "report.md").write_text(report)
    (out / "scores.json").write_text(json.dumps({"stages": scores, "control": control, "minutes": minutes},
                                                indent=1))
    log("\n" + table + "\n")
    log(f"report: {out / 'report.md'}  ({minutes:.1f} min)")
    return {"scores": scores, "control": control, "minutes": minutes, "final_dir": result["final_dir"]}
