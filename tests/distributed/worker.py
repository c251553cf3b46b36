"""Worker for the multi-process tests: runs a plan of training runs and writes their losses.

Started by the tests as ``python -m torch.distributed.run --nproc_per_node 2 worker.py PLAN.json``
(or with plain ``python`` for one process). A plan is a list of runs in three phases:

- ``pre``: one-process runs on rank 0 before the process group exists (references, or the first
  leg of a 1 -> 2 process resume);
- ``dist``: runs on every rank with the strategy given (``ddp`` | ``fsdp`` | ``deepspeed``);
- ``post``: one-process runs on rank 0 after the process group is gone (the second leg of a
  2 -> 1 process resume).

Every run trains a tiny random ``LlamaForCausalLM`` (built here from a LlamaConfig; every linear
out-feature a multiple of 32 so that bitsandbytes 4-bit layers run on CPU) on random token rows
of varied length with the prompt part unsupervised, with the mmtune Trainer and
CausalLMObjective. Rank 0 writes ``{run name: {"losses": [...], "weights": path}}`` to the
plan's ``out`` file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

GLOBAL_BATCH = 4  # rows per global micro-batch; each of N ranks takes GLOBAL_BATCH / N
VOCAB = 128


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float()


def rows(n: int = 48, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(8, 25, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        labels = ids.clone()
        labels[: int(torch.randint(1, 6, (1,), generator=g))] = -100  # the "prompt" carries no loss
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(batch: list[dict]) -> dict:
    """Right-pad to the longest row of the (per-rank) micro-batch."""
    width = max(len(r["input_ids"]) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def build_model(adapter: str, tmp: Path):
    if adapter == "qlora":
        return build_qlora(tmp)
    model = tiny_llama()
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)  # LoRA's A matrices are drawn from the global RNG
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    return model


def base_dir(tmp: Path) -> Path:
    """The fp32 tiny model saved for 4-bit loading; one copy per rank, written before the
    process group exists (transformers' save_pretrained writes weights on the main process only)."""
    return tmp / f"base-fp32-rank{os.environ.get('RANK', '0')}"


def build_qlora(tmp: Path):
    """The tiny model saved, reloaded in NF4 by transformers + bitsandbytes, with LoRA."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    src = base_dir(tmp)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(src, quantization_config=q, dtype=torch.float32, device_map="cpu")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))


def run(spec: dict, tmp: Path, distributed: bool) -> dict:
    from mmtune.config import TrainConfig
    from mmtune.distributed import DistContext, DistributedConfig, init_distributed, wrap_model
    from mmtune.train.fused_ce import FusedCausalLMObjective
    from mmtune.train.loop import Trainer
    from mmtune.train.objectives import CausalLMObjective

    ctx = init_distributed() if distributed else DistContext()
    world = ctx.world_size
    out = tmp / spec["name"]
    cfg = TrainConfig(output_dir=str(out), max_steps=spec.get("max_steps", 4), batch_size=GLOBAL_BATCH // world,
                      grad_accum=spec.get("grad_accum", 2), lr=spec.get("lr", 1e-2), warmup_steps=1,
                      max_grad_norm=1.0, progress=False, tensorboard=False, save_every=spec.get("save_every"),
                      seed=7)
    model = build_model(spec["adapter"], tmp)
    dcfg = DistributedConfig(**spec.get("distributed", {}))
    par = wrap_model(model, dcfg, ctx, train_cfg=cfg)
    objective = FusedCausalLMObjective(chunk_size=16) if spec.get("objective") == "sft-fused" else CausalLMObjective()
    evals = {}
    if spec.get("eval"):  # 5 held-out rows: an uneven number of eval batches per rank
        evals = dict(eval_rows=rows(5, seed=1), generate_fn=greedy)
        cfg = cfg.model_copy(update={"eval_prompts": ["abc"], "max_new_tokens": 4})
    trainer = Trainer(par.model, objective, rows(), collate, cfg, train_module=par.train_module,
                      device=ctx.device, **evals)
    par.attach(trainer)
    if spec.get("stop_at") is not None:
        trainer.stop_flag = lambda: trainer.step >= spec["stop_at"]
    resume = False
    if spec.get("resume"):  # [run name, step]
        name, step = spec["resume"]
        resume = tmp / name / "checkpoints" / f"step-{step:08d}"
    res = trainer.fit(resume=resume)
    norms = [h.get("grad_norm") for h in trainer.history]
    return {"losses": res["losses"], "grad_norms": norms, "steps": res["steps"], "world": world,
            "strategy": par.strategy, "eval_loss": res.get("eval_loss"), "samples": res.get("samples")}


@torch.no_grad()
def greedy(model, prompt: str) -> str:
    """A few greedy tokens (no tokenizer: characters map to ids); the Trainer's eval generation."""
    ids = torch.tensor([[ord(c) % VOCAB for c in prompt]])
    for _ in range(4):
        nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return " ".join(str(int(t)) for t in ids[0, len(prompt):])


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    tmp = Path(plan["tmp"])
    rank = int(os.environ.get("RANK", "0"))
    results: dict = {}
    if any(s["adapter"] == "qlora" for s in plan["runs"]):
        tiny_llama().save_pretrained(base_dir(tmp))
    for phase in ("pre", "dist", "post"):
        for spec in [s for s in plan["runs"] if s["phase"] == phase]:
            if phase == "dist" or rank == 0:
                t0 = time.perf_counter()
                results[spec["name"]] = run(spec, tmp, distributed=phase == "dist")
                results[spec["name"]]["seconds"] = round(time.perf_counter() - t0, 2)
        if phase == "dist":
            from mmtune.distributed import cleanup

            cleanup()
    if rank == 0:
        Path(plan["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
