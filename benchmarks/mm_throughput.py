"""Multimodal SFT throughput on CPU: packed rows vs padded (unpacked) batches, same everything else.

One tiny composed model (the built-in tiny LM + builtin:tiny-siglip with Phi-4 tiling and the
phi4_avgpool projector + builtin:tiny-conformer, a vision and a speech LoRA), one epoch over the
same mixed examples (shapes VQA and captions, wide OCR images with several tiles, spoken digits,
shapes with spoken questions), the same stage (encoders, projectors and LoRA_V train), the same
Trainer. Unpacked batches hold ``--rows x samples-per-row`` samples so that both take about the
same number of optimizer steps. Each micro-batch is split by modality group (one route each) in
both cases. Prints samples/s and real (non-padding) tokens/s, image/audio tokens included, and
the packed / unpacked ratio.

    python benchmarks/mm_throughput.py                    # ~3 minutes on 2 CPU cores
    python benchmarks/mm_throughput.py --samples 200 --max-len 384 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmtune.config import TrainConfig  # noqa: E402
from mmtune.data.templates import get_template  # noqa: E402
from mmtune.multimodal.config import MMSourceConfig, StageConfig  # noqa: E402
from mmtune.multimodal.data import LengthPolicy, build_mm_examples, collate_mm, pack_mm_examples  # noqa: E402
from mmtune.multimodal.model import tiny_composed  # noqa: E402
from mmtune.multimodal.objective import MultimodalObjective  # noqa: E402
from mmtune.multimodal.stages import apply_stage  # noqa: E402
from mmtune.train.loop import Trainer  # noqa: E402

SOURCES = ("shapes-vqa", "shapes-caption", "ocr-wide", "spoken-digits", "shapes-spoken-vqa")
STAGE = StageConfig(name="bench", sources=[], adapter="vision",
                    trainable={"vision_encoder": "full", "vision_projector": "full", "audio_encoder": "full",
                               "audio_projector": "full", "audio_projector_vs": "full", "llm": "lora"})


def run(label: str, model_seed: int, rows, batch_size: int, pad_id: int, args) -> dict:
    model = tiny_composed(cache_root=Path(args.workdir) / "enc", seed=model_seed)
    plan = apply_stage(model, STAGE, args.lr, log_fn=lambda *_: None)
    cfg = TrainConfig(output_dir=str(Path(args.workdir) / label), epochs=1, batch_size=batch_size, lr=args.lr,
                      warmup_steps=5, scheduler="constant", progress=False, tensorboard=False)
    slots = [0]  # token positions the model computes on, padding included

    def collate(b):
        batch = collate_mm(b, pad_id)
        slots[0] += sum(g["input_ids"].numel() for g in batch["groups"])
        return batch

    trainer = Trainer(model, MultimodalObjective(), rows, collate, cfg, optimizer_groups=plan.groups)
    # warm-up (allocator, first-call overheads): one forward/backward, no optimizer step; not timed
    MultimodalObjective()(model, collate_mm(rows[:batch_size], pad_id)).loss_sum.backward()
    model.zero_grad(set_to_none=True)
    slots[0] = 0
    t0 = time.perf_counter()
    while trainer.step < trainer.total_steps:  # one epoch: every row once
        trainer.train_step()
    dt = time.perf_counter() - t0
    samples = sum(len(r.get("indices", [0])) for r in rows)
    tokens = sum(len(r["input_ids"]) for r in rows)
    return {"system": label, "steps": trainer.step, "seconds": dt, "samples": samples,
            "samples_per_s": samples / dt, "tokens_per_s": tokens / dt, "padding": 1 - tokens / max(slots[0], 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=300, help="records per built-in source")
    ap.add_argument("--max-len", type=int, default=512, help="packed row length")
    ap.add_argument("--rows", type=int, default=2, help="packed rows per micro-batch")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--workdir", default="runs/bench-mm")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = tiny_composed(cache_root=Path(args.workdir) / "enc")
    template = get_template("auto", model.tokenizer)
    examples, report = build_mm_examples([MMSourceConfig(path=f"builtin:{s}", max_records=args.samples)
                                          for s in SOURCES], model, template, LengthPolicy(args.max_len, False))
    print("\n".join(report.lines()))
    packed = pack_mm_examples(examples, args.max_len)
    per_row = len(examples) / len(packed)
    unpacked_bs = max(1, round(args.rows * per_row))
    pad = model.tokenizer.pad_token_id
    print(f"{len(examples)} samples -> {len(packed)} packed rows of {args.max_len} ({per_row:.1f} samples/row); "
          f"packed: {args.rows} rows per step, unpacked: {unpacked_bs} samples per step")
    results = [run("unpacked (padded)", 0, examples, unpacked_bs, pad, args),
               run("packed", 0, packed, args.rows, pad, args)]
    print("\n| batches | steps | seconds | samples/s | real tokens/s | padding |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['system']} | {r['steps']} | {r['seconds']:.1f} | {r['samples_per_s']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['padding']:.1%} |")
    ratio = results[1]["samples_per_s"] / results[0]["samples_per_s"]
    tok_ratio = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
    print(f"\npacked / unpacked: {ratio:.2f}x samples/s, {tok_ratio:.2f}x tokens/s")
    out = {"results": results, "ratio_samples": ratio, "ratio_tokens": tok_ratio,
           "samples_per_row": per_row, "threads": torch.get_num_threads()}
    if not math.isfinite(ratio):
        raise SystemExit("no timed steps: use more --samples")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
