"""mmtune against the tools its users would pick instead, on the same LoRA SFT job.

Runners (each in its own process, interleaved A B C D A B C D over ``--rounds``):

- ``mmtune``: ``mmtune train`` with its defaults (packing on), the recipe below;
- ``trl``: TRL ``SFTTrainer`` with its defaults (padded batches, loss on the completion);
- ``trl-packing``: the same with ``packing=True`` (best-fit packing, padding-free rows);
- ``llamafactory``: LLaMA-Factory's ``train`` command (``run_exp``, what ``llamafactory-cli
  train`` calls) on an equivalent YAML, which is written next to the run for reproduction;
- ``hf-peft``: a plain transformers + PEFT loop (padded batches, ``model(**batch).loss``).

The job: a local HF model (default the real SmolLM2-135M-Instruct), ``--records`` built-in chat
records with a log-normal length spread (prompts of a few to a few hundred tokens, answers of a
sentence to a paragraph; all fit ``--max-length``), LoRA r 16 alpha 32 on every linear layer, lr
2e-4, batch 8, max_length 512, ``--steps`` optimizer steps, loss on the answers only.

The same harness measures every runner: it counts the tokens of every training batch (the
unpadded sample lengths; supervised: labels != -100 after the first position), from the
collate function of mmtune and the plain loop and from the model's inputs under the
transformers Trainer (TRL, LLaMA-Factory), and times each optimizer step. The table: real and supervised tokens/s over the steps after the first
(the first is warm-up: its time, compiling included, is a column of its own), start-up (process
start to the first step: imports, model loading, data preparation), peak RSS of the process
(``wait4``; peak GPU memory on CUDA), the last step's loss, and tokens/s relative to ``trl``.

The peers install into their own virtualenvs (``--venvs``, default ``.peers/``) with
``--install``; they never become dependencies of mmtune. ``mmtune`` and ``hf-peft`` run in this
interpreter's environment.

    python benchmarks/peers.py --install                       # set up .peers/ (once, ~5 min)
    python benchmarks/peers.py                                 # the table (CPU: ~25 min on 2 cores)
    python benchmarks/peers.py --runners mmtune,mmtune:train.fused_loss=false --rounds 1   # a lever
    python benchmarks/peers.py --prep-only                     # data preparation samples/s only

``mmtune:KEY=VALUE[+KEY=VALUE]`` runs mmtune with recipe overrides (the CPU levers in
docs/reference/performance.md were measured that way).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # mmtune's runner and the job's data; the peers' children never import it
RUNNERS = ("mmtune", "trl", "trl-packing", "llamafactory", "hf-peft")
#: The peers' own environments: pinned versions, installed by ``--install`` (torch pinned as mmtune's).
PEER_VENVS = {
    "trl": ["torch==2.13.0", "trl==1.16.0", "transformers==5.23.0", "peft==0.21.2", "datasets==5.2.0",
            "accelerate==1.16.0"],
    # LLaMA-Factory 0.9.5 caps transformers at 5.6.0 and peft at 0.18.1.
    "llamafactory": ["torch==2.13.0", "llamafactory==0.9.5", "transformers==5.6.0", "peft==0.18.1",
                     "datasets==4.0.0", "accelerate==1.11.0"],
}
VENV_OF = {"trl": "trl", "trl-packing": "trl", "llamafactory": "llamafactory"}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- the job's data
def chat_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` chat records (``messages``: user, assistant) from the built-in tasks, with a context
    of log-normal length before the question (median 4 short documents) and an answer followed by
    a log-normal number of explanatory sentences (median 2), as in real instruction data: most
    samples are short, a few long."""
    from mmtune.data.builtin import corpus, instruction_mix

    rng = random.Random(seed)
    docs = corpus(2000, seed)
    items = instruction_mix("train", n // 3 + 1, seed)
    out = []
    for i in range(n):
        it = items[i % len(items)]
        k = min(30, int(math.exp(rng.gauss(math.log(4), 0.9))))
        m = min(20, int(math.exp(rng.gauss(math.log(2), 1.0))))
        ctx = " ".join(rng.choice(docs) for _ in range(k))
        user = (f"Context: {ctx}\n\n" if ctx else "") + it["instruction"]
        answer = it["output"] + ("\n\n" + " ".join(rng.choice(docs) for _ in range(m)) if m else "")
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return out


def write_job_data(path: Path, n: int, model_dir: str, max_length: int, seed: int = 0) -> dict:
    """Write the records that fit ``max_length`` under the model's chat template to ``path``
    (JSONL); returns their length statistics."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    kept, lengths, answer_share = [], [], []
    for r in chat_records(int(n * 1.15) + 8, seed):
        full = len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=False))
        prompt = len(tok.apply_chat_template(r["messages"][:1], tokenize=True, return_dict=False,
                                             add_generation_prompt=True))
        if full <= max_length and len(kept) < n:
            kept.append(r)
            lengths.append(full)
            answer_share.append((full - prompt) / full)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    q = statistics.quantiles(lengths, n=10)
    return {"records": len(kept), "tokens_p10": q[0], "tokens_median": statistics.median(lengths),
            "tokens_p90": q[-1], "tokens_max": max(lengths), "answer_share": statistics.mean(answer_share)}


# --------------------------------------------------------------------------- the harness
class Meter:
    """Counts the tokens of the batches a runner collates and times its optimizer steps; writes
    the measurement to ``spec['result']`` as JSON."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.pending_tokens = self.pending_sup = 0
        self.steps: list[dict] = []
        self.t_step = None
        self.first_step_at = None

    def wrap_collate(self, collate):
        def counting(features, *args, **kwargs):
            batch = collate(features, *args, **kwargs)
            self.pending_tokens += sum(len(f["input_ids"]) for f in features)
            labels = batch["labels"]
            self.pending_sup += int((labels[..., 1:] != -100).sum())
            return batch

        counting.__wrapped__ = collate
        return counting

    def step_begin(self):
        self.t_step = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = time.time()

    def step_end(self, loss: float | None):
        self.steps.append({"seconds": time.perf_counter() - self.t_step, "tokens": self.pending_tokens,
                           "supervised": self.pending_sup, "loss": loss})
        self.pending_tokens = self.pending_sup = 0

    def set_last_loss(self, loss: float):
        if self.steps and self.steps[-1]["loss"] is None:
            self.steps[-1]["loss"] = float(loss)

    def write(self, **extra):
        out = {"startup_s": (self.first_step_at or time.time()) - self.spec["t_spawn"], "steps": self.steps, **extra}
        try:
            import torch

            if torch.cuda.is_available():
                out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
        except ImportError:
            pass
        Path(self.spec["result"]).write_text(json.dumps(out))


def hf_callback(meter: Meter):
    """A transformers ``TrainerCallback`` feeding ``meter`` (TRL and LLaMA-Factory)."""
    from transformers import TrainerCallback

    def count(module, args, kwargs):  # the batch as the model gets it (after the Trainer's collate)
        if not module.training:
            return
        ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels")
        meter.pending_tokens += int(mask.sum() if mask is not None else ids.numel())
        if labels is not None:
            meter.pending_sup += int((labels[..., 1:] != -100).sum())

    class MeterCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            model.register_forward_pre_hook(count, with_kwargs=True)

        def on_step_begin(self, args, state, control, **kw):
            meter.step_begin()

        def on_step_end(self, args, state, control, **kw):
            meter.step_end(None)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                meter.set_last_loss(logs["loss"])

    return MeterCallback()


# --------------------------------------------------------------------------- runners (children)
def run_mmtune(spec: dict, meter: Meter) -> None:
    import yaml

    from mmtune import cli
    from mmtune.train import loop

    recipe = {
        "objective": "sft",
        "model": {"path": spec["model"]},
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"},
        "data": {"sources": [{"path": spec["data"]}], "max_length": spec["max_length"],
                 "cache_dir": str(Path(spec["workdir"]) / "cache")},
        "train": {"output_dir": str(Path(spec["workdir"]) / "out"), "max_steps": spec["steps"],
                  "batch_size": spec["batch"], "lr": spec["lr"], "progress": False, "tensorboard": False, "seed": spec["seed"]},
    }
    path = Path(spec["workdir"]) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    init, step = loop.Trainer.__init__, loop.Trainer.train_step

    def patched_init(self, *a, **kw):
        init(self, *a, **kw)
        self.collate_fn = meter.wrap_collate(self.collate_fn)

    def timed_step(self):
        meter.step_begin()
        m = step(self)
        meter.step_end(m.get("loss"))
        return m

    loop.Trainer.__init__, loop.Trainer.train_step = patched_init, timed_step
    overrides = [f"{k}={v}" for k, v in spec.get("overrides", {}).items()]
    rc = cli.main(["train", str(path), *overrides, "--overwrite"])
    if rc:
        raise SystemExit(rc)


def _conversational(spec: dict):
    """The job's records as TRL's prompt/completion conversational dataset (completion-only loss)."""
    from datasets import Dataset

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    return Dataset.from_list([{"prompt": r["messages"][:1], "completion": r["messages"][1:]} for r in rows])


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")


def run_trl(spec: dict, meter: Meter, packing: bool = False) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(spec["seed"])
    cuda = spec["device"] == "cuda"
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if cuda else torch.float32)
    cfg = SFTConfig(output_dir=str(Path(spec["workdir"]) / "out"), max_steps=spec["steps"],
                    per_device_train_batch_size=spec["batch"], learning_rate=spec["lr"],
                    max_length=spec["max_length"], packing=packing, logging_steps=1, save_strategy="no",
                    report_to=[], seed=spec["seed"], bf16=cuda, use_cpu=not cuda, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=_conversational(spec), processing_class=tok,
                         peft_config=_lora(), callbacks=[hf_callback(meter)])
    trainer.train()


def run_llamafactory(spec: dict, meter: Meter) -> None:
    import yaml
    from llamafactory.train.tuner import run_exp

    work = Path(spec["workdir"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    (work / "data").mkdir(exist_ok=True)
    (work / "data" / "job.json").write_text(json.dumps(rows))
    (work / "data" / "dataset_info.json").write_text(json.dumps({"job": {
        "file_name": "job.json", "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    cuda = spec["device"] == "cuda"
    args = {
        "model_name_or_path": spec["model"], "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target": "all",
        "dataset": "job", "dataset_dir": str(work / "data"), "template": "chatml",
        "cutoff_len": spec["max_length"], "overwrite_cache": True, "preprocessing_num_workers": 1,
        "output_dir": str(work / "out"), "overwrite_output_dir": True, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "per_device_train_batch_size": spec["batch"],
        "gradient_accumulation_steps": 1, "learning_rate": spec["lr"], "max_steps": spec["steps"],
        "lr_scheduler_type": "linear", "bf16": cuda, "use_cpu": not cuda, "seed": spec["seed"],
        "disable_tqdm": True, "plot_loss": False,
    }
    (work / "llamafactory.yaml").write_text(yaml.safe_dump(args, sort_keys=False))
    run_exp(args=args, callbacks=[hf_callback(meter)])


def run_hf_peft(spec: dict, meter: Meter) -> None:
    """The plain loop: tokenize with the chat template (labels on the answer), shuffle, pad each
    batch to its longest sample, ``model(**batch).loss``, AdamW."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_linear_schedule_with_warmup

    torch.manual_seed(spec["seed"])
    cuda = spec["device"] == "cuda"
    device = torch.device("cuda" if cuda else "cpu")
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.bfloat16 if cuda else torch.float32)
    model = get_peft_model(model, _lora()).to(device)
    samples = []
    for line in Path(spec["data"]).read_text().splitlines():
        msgs = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
        samples.append({"input_ids": full, "labels": [-100] * len(prompt) + full[len(prompt):]})
    random.Random(spec["seed"]).shuffle(samples)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def collate(feats):
        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), pad)
        labels = torch.full((len(feats), width), -100)
        mask = torch.zeros((len(feats), width), dtype=torch.long)
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    collate = meter.wrap_collate(collate)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"])
    sched = get_linear_schedule_with_warmup(opt, 0, spec["steps"])
    model.train()
    b = spec["batch"]
    for s in range(spec["steps"]):
        meter.step_begin()
        batch = {k: v.to(device) for k, v in collate(samples[s * b:(s + 1) * b]).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        meter.step_end(float(loss))


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    meter = Meter(spec)
    name = spec["runner"]
    try:
        if name == "mmtune":
            run_mmtune(spec, meter)
        elif name == "trl":
            run_trl(spec, meter)
        elif name == "trl-packing":
            run_trl(spec, meter, packing=True)
        elif name == "llamafactory":
            run_llamafactory(spec, meter)
        elif name == "hf-peft":
            run_hf_peft(spec, meter)
        else:
            raise SystemExit(f"unknown runner {name!r}")
    finally:
        meter.write()


# --------------------------------------------------------------------------- the parent
def python_of(runner: str, venvs: Path) -> str:
    venv = VENV_OF.get(runner.split(":")[0])
    return sys.executable if venv is None else str(venvs / venv / "bin" / "python")


def install(venvs: Path, which: list[str]) -> None:
    for name in sorted({VENV_OF[r] for r in which if r in VENV_OF}):
        venv = venvs / name
        if not (venv / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
        print(f"installing {name} into {venv}: {' '.join(PEER_VENVS[name])}", flush=True)
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, *PEER_VENVS[name], "pyyaml"], check=True)
        if name == "llamafactory":
            _torchaudio_stub(venv)


def _torchaudio_stub(venv: Path) -> None:
    """LLaMA-Factory pulls torchvision and torchaudio, whose PyPI builds do not load beside torch
    2.13.0 (no matching release), and imports torchaudio at module level for audio inputs only.
    Remove both and put a stub in place of torchaudio that fails on use (this job has no audio)."""
    py = str(venv / "bin" / "python")
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio"], check=False)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    stub = Path(site) / "torchaudio"
    stub.mkdir(exist_ok=True)
    (stub / "__init__.py").write_text(
        '"""Stub written by mmtune benchmarks/peers.py: no torchaudio build matches torch 2.13.0."""\n'
        "def __getattr__(name):\n"
        "    raise ImportError(f'torchaudio.{name}: torchaudio is a stub in this benchmark venv')\n")


def parse_runner(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    if name not in RUNNERS:
        raise SystemExit(f"--runners: unknown runner {name!r}; valid: {', '.join(RUNNERS)}")
    pairs = [kv for kv in rest.split("+") if kv]
    bad = [kv for kv in pairs if "=" not in kv]
    if bad:
        raise SystemExit(f"--runners {text}: {bad[0]!r} is not KEY=VALUE (join several with +)")
    overrides = dict(kv.split("=", 1) for kv in pairs)
    if overrides and name != "mmtune":
        raise SystemExit(f"--runners {text}: recipe overrides apply to mmtune only")
    return name, overrides


def run_one(label: str, args, model_dir: str, data: Path, work: Path, rnd: int) -> dict:
    name, overrides = parse_runner(label)
    run_dir = work / f"{label.replace(':', '_').replace('=', '-')}-r{rnd}"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"runner": name, "overrides": overrides, "model": model_dir, "data": str(data), "steps": args.steps,
            "batch": args.batch, "max_length": args.max_length, "lr": 2e-4, "seed": 42, "device": args.device,
            "workdir": str(run_dir), "result": str(run_dir / "result.json"), "t_spawn": time.time()}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT / "src")}
    with open(run_dir / "log.txt", "w") as logf:
        proc = subprocess.Popen([python_of(name, args.venvs), __file__, "--child", str(run_dir / "spec.json")],
                                stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - spec["t_spawn"]
    rc = os.waitstatus_to_exitcode(status)
    res = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else {"steps": []}
    res.update(label=label, rc=rc, wall_s=wall, peak_rss_gb=usage.ru_maxrss * 1024 / 1e9, log=str(run_dir / "log.txt"))
    return res


def summarise(res: dict) -> dict:
    steps = res["steps"][1:] if len(res["steps"]) > 1 else res["steps"]
    secs = sum(s["seconds"] for s in steps) or float("nan")
    losses = [s["loss"] for s in res["steps"] if s["loss"] is not None]
    return {"tokens_per_s": sum(s["tokens"] for s in steps) / secs,
            "supervised_per_s": sum(s["supervised"] for s in steps) / secs,
            "tokens_per_step": sum(s["tokens"] for s in steps) / max(len(steps), 1),
            "startup_s": res.get("startup_s", float("nan")),
            "first_step_s": res["steps"][0]["seconds"] if res["steps"] else float("nan"),
            "peak_rss_gb": res["peak_rss_gb"],
            "peak_gpu_gib": res.get("peak_gpu_gib"), "final_loss": losses[-1] if losses else float("nan"),
            "steps": len(res["steps"]), "rc": res["rc"]}


def table(rows: dict[str, list[dict]], ref: str = "trl") -> str:
    med = {k: {f: statistics.median(r[f] for r in v) if v[0][f] is not None else None for f in v[0]}
           for k, v in rows.items()}
    base = med.get(ref, {}).get("tokens_per_s")
    gpu = any(m["peak_gpu_gib"] for m in med.values())
    head = ["runner", "tokens/s", "supervised/s", "tokens/step", "start-up s", "first step s", "peak RSS GB"]
    head += ["peak GPU GiB"] if gpu else []
    head += ["final loss", f"x {ref}", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, m in med.items():
        cells = [k, f"{m['tokens_per_s']:.0f}", f"{m['supervised_per_s']:.0f}", f"{m['tokens_per_step']:.0f}",
                 f"{m['startup_s']:.1f}", f"{m['first_step_s']:.0f}", f"{m['peak_rss_gb']:.2f}"]
        cells += [f"{m['peak_gpu_gib']:.1f}" if m["peak_gpu_gib"] else "-"] if gpu else []
        cells += [f"{m['final_loss']:.3f}", f"{m['tokens_per_s'] / base:.2f}" if base else "-", str(len(rows[k]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prep_throughput(model_dir: str, data: Path, max_length: int, work: Path, num_proc: int) -> dict:
    """Samples/s of mmtune's data preparation (load, template, tokenize, pack) on the job's
    records: cold (``num_proc`` workers, no cache) and warm (the content-hash cache)."""
    from mmtune.config import DataConfig
    from mmtune.data.packing import pack_examples
    from mmtune.data.tokenize import build_datasets
    from mmtune.models.loading import load_tokenizer

    tok = load_tokenizer(model_dir)
    out = {}
    cache = work / "prep-cache"
    for label, procs in (("cold, 1 process", 1), (f"cold, {num_proc} processes", num_proc), ("warm cache", num_proc)):
        if label.startswith("cold") and cache.exists():
            shutil.rmtree(cache)
        cfg = DataConfig(sources=[{"path": str(data)}], max_length=max_length, num_proc=procs, cache_dir=str(cache))
        t = time.perf_counter()
        train, _, _ = build_datasets(cfg, tok, "sft", 0, progress=False)
        pack_examples(train, max_length)
        out[label] = len(train) / (time.perf_counter() - t)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--model", default="builtin:smollm2-135m-instruct",
                    help="a local HF causal LM directory, or an mmtune builtin: name (default: %(default)s)")
    ap.add_argument("--runners", default=",".join(RUNNERS),
                    help="comma-separated; RUNNER:KEY=VALUE+KEY=VALUE for mmtune recipe overrides (default: all)")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--records", type=int, default=3000)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--venvs", type=Path, default=ROOT / ".peers", help="the peers' virtualenvs (default: .peers/)")
    ap.add_argument("--install", action="store_true", help="create/update the peers' virtualenvs first")
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "peers")
    ap.add_argument("--prep-only", action="store_true", help="measure data preparation only")
    ap.add_argument("--json", type=Path, help="write every run's measurements here")
    ap.add_argument("--table-from", type=Path, metavar="JSON", help="print the table of an earlier --json file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    if args.table_from:
        saved = json.loads(args.table_from.read_text())
        rows: dict[str, list[dict]] = {}
        for res in saved["runs"]:
            if res["rc"] == 0 and res["steps"]:
                rows.setdefault(res["label"], []).append(summarise(res))
        print(table(rows))
        return 0
    labels = [r.strip() for r in args.runners.split(",") if r.strip()]
    if args.install:
        install(args.venvs, [parse_runner(label)[0] for label in labels])
    for label in labels:
        py = python_of(parse_runner(label)[0], args.venvs)
        if not Path(py).exists():
            raise SystemExit(f"{label}: no virtualenv at {Path(py).parents[1]}; run with --install")
    from mmtune.models.loading import resolve_model_path

    model_dir = str(resolve_model_path(args.model))
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / "chat.jsonl"
    stats = write_job_data(data, args.records, model_dir, args.max_length)
    print(f"job: {model_dir}; {stats['records']} records, tokens p10/median/p90/max "
          f"{stats['tokens_p10']:.0f}/{stats['tokens_median']:.0f}/{stats['tokens_p90']:.0f}/{stats['tokens_max']}, "
          f"answer share {stats['answer_share']:.0%}; {args.steps} steps of batch {args.batch}, "
          f"max_length {args.max_length}, LoRA r16 all-linear; {args.device}", flush=True)
    prep = prep_throughput(model_dir, data, args.max_length, args.workdir, num_proc=max(2, os.cpu_count() or 1))
    print("data preparation (template + tokenize + pack): "
          + ", ".join(f"{k} {v:,.0f} samples/s" for k, v in prep.items()), flush=True)
    results: dict[str, list[dict]] = {label: [] for label in labels}
    raw = []
    if not args.prep_only:
        for rnd in range(args.rounds):
            for label in labels:
                res = run_one(label, args, model_dir, data, args.workdir, rnd)
                raw.append(res)
                if res["rc"] != 0 or not res["steps"]:
                    print(f"  round {rnd + 1} {label}: FAILED (rc {res['rc']}), see {res['log']}", flush=True)
                    continue
                s = summarise(res)
                results[label].append(s)
                print(f"  round {rnd + 1} {label}: {s['tokens_per_s']:.0f} tokens/s, {s['supervised_per_s']:.0f} "
                      f"supervised/s, start-up {s['startup_s']:.1f} s, peak RSS {s['peak_rss_gb']:.2f} GB, "
                      f"loss {s['final_loss']:.3f}", flush=True)
        print(table({k: v for k, v in results.items() if v}))
    if args.json:
        args.json.write_text(json.dumps({"job": stats, "prep_samples_per_s": prep, "runs": raw,
                                         "summary": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
