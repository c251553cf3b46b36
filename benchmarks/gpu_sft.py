"""GPU LoRA SFT benchmark: mmtune against plain transformers + PEFT, in one process.

For each model size (random-init Qwen2-shaped 0.5B and 1.5B, bf16, no weights needed), on the
same synthetic log-normal sample lengths (median ~350 tokens, docs/reference/performance.md#benchmark-sample-lengths):

- baseline: the anchor script ``shared/bench/hf_peft_baseline.py`` (imported by path at run
  time from ``../shared/bench`` next to the repository root, ``$MMTUNE_BASELINE`` or
  ``--baseline PATH``), its
  ``run(size, "packed", ...)``: PEFT LoRA r=16 on all linear layers, greedy packing into rows of
  4096 tokens, position ids restarting per sample, SDPA, fused AdamW, plain HF loss;
- mmtune: the same random-init model saved as a Hugging Face directory and trained by the code
  ``mmtune train`` runs, with no set-up of its own: a recipe (LoRA r=16 on all linear layers,
  ``model.attn_implementation=--attn``, ``train.compile=--compile``, the fused loss unless
  ``--no-fused-ce``), its speed plan (``mmtune.train.fast_path.plan_for_recipe``: flash-attention
  varlen when installed, else SDPA with the block-diagonal mask; bf16 weights and autocast;
  Liger-Kernel's fused linear cross-entropy when installed, else mmtune's chunked one; compile),
  the plan's collate and ``mmtune.workflows.causal.build_causal_trainer`` (model loading, LoRA,
  objective, the Trainer's step with clipping and schedule). Only the rows are synthetic: the
  same lengths, packed best-fit-decreasing.

Both are timed the same way (3 warm-up steps, then steps for ``--seconds``, synchronising every
4 steps) and report real (non-padding) tokens/s, peak GPU memory and MFU = 6 x params x
tokens/s / peak bf16 FLOP/s (``PEAK_TFLOPS``, default 790 for an H100 SXM, as the baseline);
then mmtune / baseline ratios.

    python benchmarks/gpu_sft.py                         # 0.5B and 1.5B, 25 s each side (GPU)
    python benchmarks/gpu_sft.py --sizes 1.5B --gc       # with gradient checkpointing
    python benchmarks/gpu_sft.py --dry-run               # a tiny model on CPU, seconds; checks the plumbing

Results go to stdout (a Markdown table and one JSON line per row) and, with ``--json`` or when
``$OUT`` is set, to a JSON file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
#: The anchor script; ``$MMTUNE_BASELINE`` names another place (a checkout without ../shared).
DEFAULT_BASELINE = Path(os.environ.get("MMTUNE_BASELINE", REPO.parent / "shared" / "bench" / "hf_peft_baseline.py"))
#: A Qwen2 shape small enough for a CPU dry run (every size in the table is random-init anyway).
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, tie_word_embeddings=True)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_baseline(path: Path | str = DEFAULT_BASELINE):
    """The anchor script as a module (its ``SIZES``, ``sample_lengths``, ``batches_packed``,
    ``run``...). It is not part of this repository: it lives in ``shared/bench``."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"baseline script not found at {path}; pass --baseline PATH (hf_peft_baseline.py)")
    spec = importlib.util.spec_from_file_location("hf_peft_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B"], help="model sizes of the baseline's SIZES")
    ap.add_argument("--seconds", type=float, default=25.0, help="timed window per run, after 3 warm-up steps")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per packed row")
    ap.add_argument("--rows", type=int, default=2, help="packed rows per step")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--baseline-liger", action="store_true", help="the baseline with Liger's fused CE too")
    ap.add_argument("--attn", default="auto", help="mmtune attention: auto | flash_attention_2 | sdpa | ...")
    ap.add_argument("--no-fused-ce", action="store_true", help="mmtune with the plain (logits) loss "
                    "(train.fused_loss=false; default true: Liger where installed, else chunked)")
    ap.add_argument("--compile", default="auto", type=lambda v: {"true": True, "false": False}.get(v, v),
                    choices=["auto", True, False], help="mmtune's train.compile: auto (the decoder on CUDA) | true | false")
    ap.add_argument("--only", choices=["both", "mmtune", "baseline"], default="both")
    ap.add_argument("--baseline", default=str(DEFAULT_BASELINE), help="path to hf_peft_baseline.py")
    ap.add_argument("--json", default=None, help="write the rows here (default $OUT/gpu_sft.json when $OUT is set)")
    ap.add_argument("--dry-run", action="store_true", help="tiny Qwen2 on CPU for a few steps: checks the "
                    "benchmark runs end to end without a GPU (numbers meaningless)")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.sizes, args.seq, args.rows, args.seconds = ["tiny"], min(args.seq, 256), min(args.rows, 2), min(args.seconds, 2.0)
    elif not torch.cuda.is_available():
        ap.error("no CUDA device: this benchmark measures GPUs (use --dry-run to check it on CPU)")
    return args


def size_config(bl, size: str) -> dict:
    if size == "tiny":
        return TINY
    if size not in bl.SIZES:
        raise SystemExit(f"unknown size {size!r}; the baseline defines {', '.join(bl.SIZES)} (and tiny for --dry-run)")
    return bl.SIZES[size]


def lengths_for(bl, seq: int, n: int, seed: int = 0) -> list[int]:
    """The baseline's log-normal sample lengths (median ~350, clipped to [16, 2048]); for rows
    shorter than 2 x 2048 (the dry run) also clipped to half a row, so that the baseline's greedy
    packing never closes an empty row."""
    gen = torch.Generator().manual_seed(seed)
    return [min(x, seq // 2) for x in bl.sample_lengths(n, gen)]


def make_model(shape: dict, device: torch.device, dtype: torch.dtype, attn: str, gc: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**shape, max_position_embeddings=32768)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


# ------------------------------------------------------------------------------------ mmtune


def mmtune_rows(lengths: list[int], seq: int, vocab: int, seed: int = 0) -> list[dict]:
    """mmtune's best-fit-decreasing packing of the sample lengths into rows of ``seq`` tokens,
    filled with random tokens; the first token of each sample carries no label (as in the
    baseline and in mmtune's tokenizer output)."""
    from mmtune.data.packing import pack_examples

    packed = pack_examples([{"input_ids": range(n), "labels": range(n)} for n in lengths], seq)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for r in packed:
        n = len(r["input_ids"])
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        starts = torch.tensor([0] + list(torch.tensor(r["lengths"]).cumsum(0)[:-1]))
        labels[starts] = -100
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "position_ids": r["position_ids"]})
    return rows


def timed(step, n_tokens, device: torch.device, seconds: float) -> tuple[float, int]:
    """3 warm-up steps, then steps for ``seconds``; returns (real tokens/s, steps) as the baseline does."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    sync()
    t0, toks, steps = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < seconds:
        toks += n_tokens(step())
        steps += 1
        if steps % 4 == 0:
            sync()
    sync()
    return toks / (time.perf_counter() - t0), steps


def save_random_model(shape: dict, device: torch.device, dtype: torch.dtype, where: Path) -> Path:
    """A random-init Qwen2 of ``shape`` (seed 0) saved as a Hugging Face directory: the
    ``model.path`` that mmtune's side loads like any user's model."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**shape, max_position_embeddings=32768)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.save_pretrained(where)
    del model
    return where


def mmtune_recipe(model_dir: Path, args, out_dir: Path):
    """The recipe ``mmtune train`` would run for this measurement (validated by the same schema)."""
    from mmtune.config import validate_recipe

    # A CPU dry run is a smoke test: no minutes of compiling unless --compile true asks for it.
    compile_ = False if args.dry_run and args.compile == "auto" else args.compile
    return validate_recipe({
        "model": {"path": str(model_dir), "dtype": "auto", "attn_implementation": args.attn,
                  "gradient_checkpointing": args.gc},
        "adapter": {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "targets": LORA_TARGETS},
        "data": {"packing": True, "max_length": args.seq},
        "train": {"output_dir": str(out_dir), "batch_size": args.rows, "max_steps": 10**6, "lr": 1e-4,
                  "warmup_steps": 0, "scheduler": "constant", "max_grad_norm": 1.0, "precision": "auto",
                  "fused_loss": not args.no_fused_ce, "compile": compile_, "progress": False,
                  "tensorboard": False},
    }, "benchmarks/gpu_sft.py")


def run_mmtune(bl, size: str, args, device: torch.device) -> dict:
    """mmtune's side through ``mmtune train``'s own code: the recipe's speed plan
    (``plan_for_recipe``), the plan's collate (``causal_collate``) and
    ``build_causal_trainer`` (model loading with the plan's kernel, dtype and checkpointing,
    LoRA, compile, the fused-loss objective, the Trainer). Only the rows are synthetic."""
    import tempfile

    from mmtune.distributed import init_distributed
    from mmtune.train.fast_path import causal_collate, plan_for_recipe
    from mmtune.workflows.causal import build_causal_trainer

    shape = size_config(bl, size)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    with tempfile.TemporaryDirectory(dir=tmp, prefix="mmtune-gpu-sft-") as work:
        work = Path(work)
        recipe = mmtune_recipe(work / "model", args, work / "run")
        dist = init_distributed(recipe.distributed)
        plan = plan_for_recipe(recipe, dist.device, dist.world_size)
        for line in plan.lines():
            print(line, flush=True)
        save_random_model(shape, device, plan.dtype, work / "model")
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        # Enough samples for the window at ~50k tokens/s (GPU) or the dry run's few steps.
        n_samples = 2000 if device.type != "cuda" else int(max(4000, 100_000 * (args.seconds + 10) / 350))
        rows = mmtune_rows(lengths_for(bl, args.seq, n_samples), args.seq, shape["vocab_size"])
        collate = causal_collate(plan, pad_id=0)
        last = {"real": 0}

        def counted(batch):  # the plan's collate, counting the real (non-padding) tokens
            last["real"] = sum(len(r["input_ids"]) for r in batch)
            return collate(batch)

        trainer = build_causal_trainer(recipe, plan, dist, rows, counted, log=lambda *a: None)
        plan = trainer.speed_plan  # the same plan, its compile choice settled with the model
        n_total = sum(p.numel() for p in trainer.model.parameters())

        def step():
            trainer.train_step()
            return last["real"]

        tps, steps = timed(step, lambda n: n, device, args.seconds)
        loaded = trainer.model.get_base_model().config._attn_implementation
    row = dict(side="mmtune", size=size, attn=loaded, fused_ce=plan.fused, loss=plan.loss, packing=plan.packing,
               gc=plan.gradient_checkpointing, compile=plan.compile, rows=args.rows, seq=args.seq,
               tokens_per_s=round(tps), steps=steps, params_M=round(n_total / 1e6), **memory_and_mfu(device, n_total, tps))
    return row


def memory_and_mfu(device: torch.device, n_total: int, tps: float) -> dict:
    if device.type != "cuda":
        return {"peak_gib": None, "mfu_6N": None}
    peak = float(os.environ.get("PEAK_TFLOPS", "790")) * 1e12
    return {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "mfu_6N": round(6 * n_total * tps / peak, 3)}


# ---------------------------------------------------------------------------------- baseline


def run_baseline(bl, size: str, args, device: torch.device) -> dict:
    """The anchor's own ``run()`` on a GPU; for the CPU dry run, the same steps (its
    ``batches_packed`` and ``step`` logic) without its CUDA calls."""
    if device.type == "cuda":
        kw = dict(seconds=args.seconds, seq=args.seq, rows=args.rows)
        row = bl.run(size, "packed", args.gc, args.baseline_liger, **kw)
        return {"side": "baseline", **row}
    from peft import LoraConfig, get_peft_model

    shape = size_config(bl, size)
    model = make_model(shape, device, torch.float32, "sdpa", args.gc)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
    n_total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    it = bl.batches_packed(lengths_for(bl, args.seq, 2000), args.seq, args.rows, shape["vocab_size"], gen)

    def step():
        batch, real = next(it)
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return real

    tps, steps = timed(step, lambda n: n, device, args.seconds)
    return dict(side="baseline", size=size, mode="packed", gc=args.gc, liger=False, attn="sdpa", rows=args.rows,
                tokens_per_s=round(tps), steps=steps, params_M=round(n_total / 1e6), **memory_and_mfu(device, n_total, tps))


# ------------------------------------------------------------------------------------ report


def ratios(mm: dict, base: dict) -> dict:
    def ratio(key):
        a, b = mm.get(key), base.get(key)
        return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    return {"side": "mmtune/baseline", "size": mm["size"], "tokens_per_s": ratio("tokens_per_s"),
            "peak_gib": ratio("peak_gib"), "mfu_6N": ratio("mfu_6N")}


def table(rows: list[dict]) -> str:
    cols = ["side", "size", "tokens_per_s", "peak_gib", "mfu_6N", "steps", "attn"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r.get("error", "") if c == "tokens_per_s" and "error" in r else r.get(c, "") for c in cols]
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    bl = load_baseline(args.baseline)
    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    import peft
    import transformers

    where = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, {where}")
    out: list[dict] = []
    for size in args.sizes:
        pair = {}
        for side, fn in (("baseline", run_baseline), ("mmtune", run_mmtune)):
            if args.only not in ("both", side):
                continue
            try:
                pair[side] = fn(bl, size, args, device)
            except torch.OutOfMemoryError:
                pair[side] = {"side": side, "size": size, "error": "OOM"}
            except Exception as e:  # a failed side is a result to report, not a reason to stop
                pair[side] = {"side": side, "size": size, "error": repr(e)[:300]}
            print(json.dumps(pair[side]), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out += list(pair.values())
        if len(pair) == 2:
            out.append(ratios(pair["mmtune"], pair["baseline"]))
    print(table(out))
    path = args.json or (os.path.join(os.environ["OUT"], "gpu_sft.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
