"""`mmtune demo --multimodal`: give the tiny built-in LLM eyes and ears, stage by stage, on a CPU.

1. the tiny Llama-style LM after the text demo's continued pretraining
   (``builtin:tiny-pretrained``, :func:`mmtune.models.tiny.ensure_tiny_pretrained`) plays "any
   LLM": a pretrained base, as in Phi-4-MM (LoRA on the randomly initialised tiny LM leaves VQA
   at chance: measured 25% against a shuffled-media control of 25%; on the pretrained one 45%);
2. data is drawn in code with the built-in generators: shapes images with captions and colour /
   count / position questions, OCR of words (square 64 px) and of 3-4 words and numbers on 4:1
   wide images that are cut into several tiles, and spoken digit strings from the procedural
   speech engine. The shapes questions are the single-object subset (the colour of the only
   shape, the position of the only shape, how many shapes when all are of the asked kind) and
   the square OCR images show one of the 30 built-in words: a 1M-parameter model can learn
   those in minutes on a CPU, while binding a colour to one shape among distractors needs far
   more training than a demo has;
3. a tiny SigLIP tower and a tiny Conformer, each first pretrained alone on the built-in data
   (:mod:`mmtune.multimodal.encoder_pretrain`, cached: the SigLIP tower classifies the kind and
   colour of each cell of the shapes layout, the Conformer transcribes spoken digits with CTC),
   as a real VLM starts from a pretrained SigLIP and Phi-4-MM from a pretrained audio encoder.
   From random towers the tiny demo is bistable: tiny numeric changes (a reordered fp32 sum)
   flipped VQA between 45% and chance (23.3%) across runs, because whether vision is learned
   at all hangs on the first steps of the joint stage. With pretrained towers it is stable.
   The towers go with Phi-4 tiling and the ``phi4_avgpool`` projector, an MLP audio
   projector, and a vision and a speech LoRA, composed with the LM and trained with
   Phi-4-multimodal's staged recipe (docs/reference/multimodal.md#phi-4-training-stages):
   vision (1) projector alignment on captions, (2) encoder + projector, (3) LoRA_V SFT with
   encoder + projector; speech (4) encoder + projector with the decoder frozen, (5) LoRA_A SFT
   with encoder + projector. On SmolLM2 (``--lm smollm2``) the towers stay frozen and stages 2
   and 4 are left out: a SmolLM2 step costs about 30 tiny-LM steps on a CPU;
4. every task is scored before and after each stage, and a Markdown report is written.

Scores (all on held-out draws):

- caption: token accuracy, the share of caption tokens (and the end-of-turn token) that the
  model predicts correctly by argmax given the reference prefix (teacher forcing); captions are
  long, exact match would hide progress;
- VQA: exact match of the greedy answer (colour / count / position; chance 1/5, 1/4, 1/4);
- OCR: token accuracy and exact match, square (one word) and wide (3-4 words and numbers);
- ASR: exact match of the greedy transcript ("3 7 1") and token accuracy;
- text: exact match on the built-in held-out instruction tasks
  (:func:`mmtune.evaluation.exact_match`) through the router's text route (adapters off), and
  the largest change of the text route's logits on those prompts since before the first stage:
  the text route runs the untouched base model, so it is exactly 0;
- control: the final model with every image / clip swapped for another sample's of the same
  task: what the answer format and priors alone score. The gap to it is what the model reads
  from the media.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import validate_recipe
from ..data.builtin import TASKS, builtin_records
from ..data.formats import detect_format, normalize
from ..data.templates import get_template
from ..errors import ConfigError
from ..evaluation import exact_match
from ..models.loading import load_tokenizer, resolve_model_path
from ..models.tiny import ensure_tiny, ensure_tiny_pretrained
from .data import MediaCache
from .run import run_multimodal_recipe
from .tasks import (  # noqa: F401 - the demo's data and scoring, re-exported
    IMAGE_SIZE,
    VQA_CHANCE,
    exact_match_items,
    load_eval_items,
    make_demo_data,
    shuffled,
    token_accuracy_items,
)

#: Steps and sizes: the full demo (12.3 min measured at one thread on a shared 2-core CPU, the
#: towers' pretraining included) and ``--quick`` (a smoke run).
#: n_train: captions, VQA, OCR square, OCR wide, ASR; n_eval: the same and text prompts.
FULL = dict(steps=(100, 150, 400, 100, 400), n_train=(300, 600, 300, 150, 500), n_eval=(40, 60, 30, 20, 40, 30))
QUICK = dict(steps=(2, 2, 2, 2, 2), n_train=(8, 9, 4, 4, 8), n_eval=(3, 6, 3, 2, 3, 3))

TASKS_EVAL = ("caption", "vqa", "ocr", "ocr_wide", "asr")
EVAL_SEED = 1000

#: The language models the demo composes: the tiny built-in one (default) and the real SmolLM2.
#: ``template``: the chat template of the recipe; ``lora_r`` the rank of both LoRAs, ``lr`` their
#: learning rate; ``full`` / ``quick`` the schedules (steps of the five stages, 0 = the stage is
#: left out); ``encoders``: ``scratch`` trains the random tiny towers through the LM in the stages,
#: ``pretrained`` first pretrains them alone on the built-in data
#: (:mod:`mmtune.multimodal.encoder_pretrain`, cached) and keeps them frozen, as a real VLM starts
#: from a pretrained SigLIP: a step of SmolLM2 costs about 30 of the tiny LM on a CPU, too many to
#: train a tower from scratch through it; ``evaluate``: the stages after which the tasks are scored
#: (all when absent; before the first stage always).
LMS = {
    "tiny": dict(path=None, template="auto", lora_r=32, lr=3e-3, full=FULL, quick=QUICK, tasks=TASKS_EVAL,
                 encoders="pretrained", train_encoders=True, batch_size=4),
    "smollm2": dict(path="builtin:smollm2-135m-instruct", template="chatml", lora_r=16, lr=1e-3,
                    tasks=("caption", "vqa", "asr"), evaluate=("vision-sft", "speech-sft"),
                    encoders="pretrained", train_encoders=False, batch_size=1,
                    full=dict(steps=(20, 0, 80, 15, 60), n_train=(150, 400, 0, 0, 300),
                              n_eval=(20, 60, 0, 0, 30, 15)),
                    quick=dict(steps=(1, 0, 1, 1, 1), n_train=(4, 6, 0, 0, 4), n_eval=(2, 6, 0, 0, 2, 3))),
}



def _recipe(out: Path, lm_dir: Path, data: dict[str, Path], steps: tuple[int, ...], template: str = "auto",
            lora_r: int = 32, llm_lr: float = 3e-3, encoders: dict[str, Path] | None = None,
            batch_size: int = 4, train_encoders: bool = True) -> dict:
    """The demo's recipe. ``encoders``: pretrained tower directories (``vision``, ``audio``) instead
    of the random built-in towers; ``train_encoders=False`` keeps the towers frozen in every stage."""
    def src(*names):  # the demo's tasks among ``names`` (a language model's profile may leave some out)
        return [{"path": str(data[n])} for n in names if n in data]

    s1, s2, s3, s4, s5 = steps
    recipe = {
        "objective": "sft",
        "model": {"path": str(lm_dir), "dtype": "float32"},
        "data": {"template": template, "max_length": 256, "packing": True},
        "train": {"output_dir": str(out / "run"), "batch_size": batch_size, "lr": 1e-3, "warmup_steps": 10,
                  "weight_decay": 0.0, "save_every": 10_000, "keep_last": 1, "tensorboard": False,
                  "progress": False, "log_every": 25},
        "multimodal": {
            "vision": {"path": "builtin:tiny-siglip", "tiling": "phi4", "max_crops": 4, "projector": "phi4_avgpool"},
            "audio": {"path": "builtin:tiny-conformer"},
            "vision_speech": False,
            "adapters": [{"name": "vision", "r": lora_r, "alpha": 2 * lora_r, "dropout": 0.0, "targets": "all-linear"},
                         {"name": "speech", "r": lora_r, "alpha": 2 * lora_r, "dropout": 0.01,
                          "targets": "all-linear"}],
            "stages": [
                {"name": "vision-align", "sources": src("caption"), "max_steps": s1,
                 "trainable": {"vision_projector": "full"}, "lr": {"vision_projector": 2e-3}},
                {"name": "vision-joint", "sources": src("caption", "vqa", "ocr", "ocr_wide"), "max_steps": s2,
                 "trainable": {"vision_encoder": "full", "vision_projector": "full"},
                 "lr": {"vision_encoder": 1e-3, "vision_projector": 2e-3}},
                {"name": "vision-sft", "sources": src("vqa", "ocr", "ocr_wide", "caption"), "max_steps": s3,
                 "trainable": {"vision_encoder": "full", "vision_projector": "full", "llm": "lora"},
                 "adapter": "vision", "lr": {"vision_encoder": 1e-3, "vision_projector": 3e-3, "llm": llm_lr}},
                {"name": "speech-align", "sources": src("asr"), "max_steps": s4,
                 "trainable": {"audio_encoder": "full", "audio_projector": "full"},
                 "lr": {"audio_encoder": 2e-3, "audio_projector": 2e-3}},
                {"name": "speech-sft", "sources": src("asr"), "max_steps": s5,
                 "trainable": {"audio_encoder": "full", "audio_projector": "full", "llm": "lora"},
                 "adapter": "speech", "lr": {"audio_encoder": 1e-3, "audio_projector": 3e-3, "llm": llm_lr}},
            ],
        },
    }
    mm = recipe["multimodal"]
    mm["stages"] = [st for st in mm["stages"] if st["max_steps"] > 0 and st["sources"]]
    if encoders:
        mm["vision"]["path"], mm["audio"]["path"] = str(encoders["vision"]), str(encoders["audio"])
    if not train_encoders:
        for st in mm["stages"]:
            for enc in ("vision_encoder", "audio_encoder"):
                st["trainable"].pop(enc, None)
                st["lr"].pop(enc, None)
    return recipe


# ---------------------------------------------------------------------------------------------
# Evaluation


def _text_logits(model, template, records: list[dict]) -> list[torch.Tensor]:
    """Logits of the router's text route on the prompts of ``records`` (one forward each)."""

    out = []
    for rec in records:
        msgs = normalize(rec, detect_format(rec))["messages"]
        ids = torch.tensor([template.prompt_ids(msgs[:-1])])
        out.append(model(ids, group="text").logits[0].float().cpu())
    return out


@torch.no_grad()
def evaluate_tasks(model, template, items: dict[str, list[dict]], text_records: list[dict],
                   state: dict | None = None) -> dict[str, float]:
    """Every score of the report for ``model`` (see the module docstring). ``state`` keeps the text
    route's first logits, against which later calls measure the change."""

    model.eval()
    s: dict[str, float] = {}
    if "caption" in items:
        s["caption/token_acc"] = token_accuracy_items(model, template, items["caption"])
    if "vqa" in items:
        for q in VQA_CHANCE:
            sub = [it for it in items["vqa"] if it["qtype"] == q]
            s[f"vqa-{q}/exact_match"] = exact_match_items(model, template, sub, 5)
        s["vqa/exact_match"] = sum(s[f"vqa-{q}/exact_match"] * sum(it["qtype"] == q for it in items["vqa"])
                                   for q in VQA_CHANCE) / max(len(items["vqa"]), 1)
    for task, n_new in (("ocr", 8), ("ocr_wide", 24)):
        if task in items:
            s[f"{task}/token_acc"] = token_accuracy_items(model, template, items[task])
            s[f"{task}/exact_match"] = exact_match_items(model, template, items[task], n_new)
    if "asr" in items:
        s["asr/exact_match"] = exact_match_items(model, template, items["asr"], 10)
        s["asr/token_acc"] = token_accuracy_items(model, template, items["asr"])
    if text_records:
        route = model.router.route("text", n_samples=0)
        with model.router.activate(model.language_model, route):
            s["text/exact_match"] = exact_match(model.language_model, model.tokenizer, template, text_records,
                                                16)["exact_match"]
        logits = _text_logits(model, template, text_records)
        if state is not None:
            first = state.setdefault("text_logits", logits)
            # over the base vocabulary (composing adds the media placeholder tokens after it)
            s["text/max_logit_change"] = max(float((a - b[..., :a.shape[-1]]).abs().max()) for a, b in zip(first, logits))
    model.train()
    return s


ROWS = [("caption/token_acc", "caption (token acc.)"), ("vqa-color/exact_match", "VQA colour (EM)"),
        ("vqa-count/exact_match", "VQA count (EM)"), ("vqa-position/exact_match", "VQA position (EM)"),
        ("vqa/exact_match", "VQA all (EM)"), ("ocr/token_acc", "OCR square (token acc.)"),
        ("ocr/exact_match", "OCR square (EM)"), ("ocr_wide/token_acc", "OCR wide (token acc.)"),
        ("ocr_wide/exact_match", "OCR wide (EM)"), ("asr/exact_match", "ASR digits (EM)"),
        ("asr/token_acc", "ASR digits (token acc.)"), ("text/exact_match", "text tasks (EM, text route)"),
        ("text/max_logit_change", "text route: max abs. logit change")]


def _table(scores: dict[str, dict], control: dict[str, float], chance: dict[str, float]) -> str:
    cols = list(scores)
    lines = ["| task (metric) | " + " | ".join(cols) + " | control: media shuffled | chance |",
             "|---" * (len(cols) + 3) + "|"]
    for key, label in ROWS:
        if not any(key in scores[c] for c in cols):
            continue
        fmt = "{:.2g}" if "logit" in key else "{:.1%}"
        vals = " | ".join(fmt.format(scores[c].get(key, float("nan"))) for c in cols)
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


def _plain_text_logits(lm_dir: Path, template, records: list[dict]) -> list[torch.Tensor]:
    """Logits of the plain language model (loaded by transformers alone, nothing composed) on the
    prompts of ``records``: what the router's text route must reproduce to the last bit."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [base(torch.tensor([template.prompt_ids(normalize(r, detect_format(r))["messages"][:-1])]))
                .logits[0].float() for r in records]


def run_multimodal_demo(output: str = "runs/demo-multimodal", quick: bool = False, log=print,
                        lm: str = "tiny") -> dict:
    """Run the demo (module docstring) into ``output`` with the language model ``lm`` (a key of
    :data:`LMS`); returns the scores per stage."""

    if lm not in LMS:
        raise ConfigError(f"multimodal demo: unknown language model '{lm}'; valid: {', '.join(LMS)}")
    spec = LMS[lm]
    t0 = time.time()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = spec["quick"] if quick else spec["full"]
    log("[1/4] built-in data: shapes (captions, VQA), OCR (square words, wide multi-tile), spoken digits")
    tasks = spec["tasks"]
    train = {k: v for k, v in make_demo_data(out / "data" / "train", cfg["n_train"], seed=0).items() if k in tasks}
    n_eval = cfg["n_eval"]
    evals = make_demo_data(out / "data" / "eval", n_eval[:5], seed=EVAL_SEED)
    text_records = builtin_records("instruct-eval")
    per_task = max(1, n_eval[5] // len(TASKS))
    text_records = [r for t in TASKS for r in [x for x in text_records if x["task"] == t][:per_task]]

    if spec["path"] is not None:
        lm_dir = resolve_model_path(spec["path"])
    else:  # quick: a smoke run, no 1.5 min build
        lm_dir = ensure_tiny() if quick else ensure_tiny_pretrained(log=log)
    encoders = None
    if spec["encoders"] == "pretrained" and not quick:  # quick: a smoke run on the random towers
        from .config import MultimodalConfig
        from .encoder_pretrain import ensure_pretrained_encoders

        mm = MultimodalConfig.model_validate(_recipe(out, lm_dir, train, cfg["steps"])["multimodal"])
        encoders = ensure_pretrained_encoders(mm.vision, mm.audio, log=log)
    recipe = validate_recipe(_recipe(out, lm_dir, train, cfg["steps"], spec["template"], spec["lora_r"], spec["lr"],
                                     encoders, spec["batch_size"], spec["train_encoders"]))
    scores: dict[str, dict] = {}
    # the text route is measured against the plain LM's logits, loaded by transformers alone
    state: dict = {"text_logits": _plain_text_logits(lm_dir, get_template(recipe.data.template,
                                                                          load_tokenizer(lm_dir)), text_records)}

    def on_stage_end(name, result, model):
        if "items" in state and name not in spec.get("evaluate", (name,)):
            return  # a language model whose evaluation is expensive is scored after the SFT stages only
        if "items" not in state:
            state["template"] = get_template(recipe.data.template, model.tokenizer)
            cache = MediaCache(model)
            state["items"] = {task: load_eval_items(evals[task], model, cache, task) for task in tasks}
        t = time.time()
        scores[name] = evaluate_tasks(model, state["template"], state["items"], text_records, state)
        log(f"  scores after {name} ({time.time() - t:.0f} s): "
            + ", ".join(f"{k} {v:.0%}" for k, v in scores[name].items() if "-" not in k.split("/")[0]
                        and "logit" not in k))

    log(f"[2/4] composed model: {lm} LM ({lm_dir}) + tiny SigLIP (phi4 tiling, phi4_avgpool) + tiny Conformer (MLP), "
        "LoRA_V and LoRA_A; the router sends text to the base model")
    log("[3/4] Phi-4-style stages: vision-align, vision-joint, vision-sft (LoRA_V), speech-align, speech-sft "
        "(LoRA_A)")
    result = run_multimodal_recipe(recipe, overwrite=True, log=log, on_stage_end=on_stage_end,
                                   cache_root=out / "encoders")
    model = result["model"]
    control_items = {task: shuffled(v, seed=1) for task, v in state["items"].items()}
    control = evaluate_tasks(model, state["template"], control_items, [], None)

    log("[4/4] report")
    minutes = (time.time() - t0) / 60
    table = _table(scores, control, _chance(state["items"]))
    stages = "\n".join(f"- **{s['stage']}**: {s['steps']} steps, {s['trainable']:,} trainable parameters, "
                       f"{s['examples']} examples, final loss {s['final_loss']:.3f}" for s in result["stages"])
    report = (
        "# mmtune multimodal demo report\n\n"
        f"The language model `{lm}` ({spec['path'] or 'builtin:tiny-pretrained'}) composed with a tiny SigLIP tower (Phi-4 tiling, phi4_avgpool projector) and a tiny "
        "Conformer (MLP projector), with a vision and a speech LoRA picked by the modality router (text -> base "
        "model), trained with Phi-4-multimodal's stages on built-in data (see mmtune/multimodal/demo.py for the "
        "data subsets and metrics).\n\n"
        f"{stages}\n\n"
        "Scores on held-out draws before training and after each stage. EM = exact match of the greedy answer; "
        "token acc. = teacher-forced next-token accuracy on the answer tokens (end-of-turn token included). "
        "`control`: the final model with each sample's image/audio swapped for another sample's: what priors "
        "alone score. The text rows run through the router's text route (adapters off): the multimodal stages "
        "leave it unchanged, to the last bit of its logits.\n\n"
        f"{table}\n\nTotal time: {minutes:.1f} min.\n\nChat with the result:\n\n"
        f"    mmtune chat {result['final_dir']} --image IMAGE.png\n")
    (out / "report.md").write_text(report)
    (out / "scores.json").write_text(json.dumps({"stages": scores, "control": control, "minutes": minutes},
                                                indent=1))
    log("\n" + table + "\n")
    log(f"report: {out / 'report.md'}  ({minutes:.1f} min)")
    return {"scores": scores, "control": control, "minutes": minutes, "final_dir": result["final_dir"]}
