"""benchmarks/gpu_sft.py: importable, its arguments parse, its mmtune side is the code of `mmtune
train` (the recipe's speed plan and build_causal_trainer, no set-up of its own), and --dry-run
runs both sides end to end on CPU with a tiny Qwen2 (the GPU numbers need a GPU; see the module
docstring)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("gpu_sft")


def test_arguments(bench):
    args = bench.parse_args(["--dry-run", "--sizes", "0.5B", "--seconds", "9"])
    assert args.sizes == ["tiny"] and args.seq == 256 and args.seconds == 2.0 and args.dry_run
    if not __import__("torch").cuda.is_available():
        with pytest.raises(SystemExit):  # a GPU benchmark refuses to run on CPU without --dry-run
            bench.parse_args([])


def test_baseline_is_found_and_lengths_are_shared(bench):
    if not bench.DEFAULT_BASELINE.is_file():
        pytest.skip(f"the anchor script is not at {bench.DEFAULT_BASELINE}")
    bl = bench.load_baseline()
    assert set(bl.SIZES) >= {"0.5B", "1.5B"}
    lengths = bench.lengths_for(bl, 4096, 20000)
    assert max(lengths) <= 2048 and min(lengths) >= 16
    lengths.sort()
    assert 300 < lengths[len(lengths) // 2] < 400  # log-normal, median ~350 (docs/reference/performance.md#benchmark-sample-lengths)
    rows = bench.mmtune_rows(lengths[:300], 4096, 1000)
    assert sum(len(r["input_ids"]) for r in rows) == sum(lengths[:300])
    assert all(len(r["input_ids"]) <= 4096 for r in rows)
    starts = sum(r["position_ids"].count(0) for r in rows)
    assert starts == 300 == sum(1 for r in rows for lab in r["labels"] if lab == -100)


def test_dry_run(bench, tmp_path):
    if not bench.DEFAULT_BASELINE.is_file():
        pytest.skip(f"the anchor script is not at {bench.DEFAULT_BASELINE}")
    out = tmp_path / "rows.json"
    rows = bench.main(["--dry-run", "--seconds", "0.5", "--json", str(out)])
    sides = {r["side"]: r for r in rows}
    assert set(sides) == {"baseline", "mmtune", "mmtune/baseline"}
    for side in ("baseline", "mmtune"):
        assert "error" not in sides[side], sides[side]
        assert sides[side]["tokens_per_s"] > 0 and sides[side]["steps"] >= 1
    assert sides["mmtune"]["fused_ce"] and sides["mmtune"]["attn"] == "sdpa"
    ratio = sides["mmtune/baseline"]["tokens_per_s"]
    assert ratio == round(sides["mmtune"]["tokens_per_s"] / sides["baseline"]["tokens_per_s"], 3)
    assert json.loads(out.read_text()) == rows


def test_mmtune_side_is_the_mmtune_train_code(bench, monkeypatch):
    import mmtune.workflows.causal as causal

    built = []
    real = causal.build_causal_trainer

    def spy(recipe, plan, *args, **kwargs):
        built.append((recipe, plan, real(recipe, plan, *args, **kwargs)))
        return built[-1][2]

    monkeypatch.setattr(causal, "build_causal_trainer", spy)

    def sample_lengths(n, gen):  # the baseline's log-normal lengths, shorter (its script is not needed here)
        return (torch.randn(n, generator=gen) * 0.5 + math.log(60)).exp().clamp(16, 200).long().tolist()

    bl = SimpleNamespace(SIZES={}, sample_lengths=sample_lengths)
    for extra, loss in (([], "chunked"), (["--no-fused-ce"], "plain")):
        args = bench.parse_args(["--dry-run", "--seconds", "0.1", "--seq", "128", "--rows", "1", *extra])
        row = bench.run_mmtune(bl, "tiny", args, torch.device("cpu"))
        recipe, plan, trainer = built[-1]
        base = trainer.model.get_base_model()
        assert row["attn"] == plan.attention.implementation == base.config._attn_implementation == "sdpa"
        assert row["loss"] == plan.loss == loss and row["packing"] == plan.packing == "position_ids"
        fused = type(trainer.objective).__name__ == "FusedCausalLMObjective"
        assert fused == (loss != "plain") == row["fused_ce"]
        assert base.config.hidden_size == bench.TINY["hidden_size"] and type(base).__name__ == "Qwen2ForCausalLM"
        assert recipe.adapter.r == 16 and recipe.data.max_length == row["seq"] == 128
        assert row["tokens_per_s"] > 0 and row["steps"] >= 1
    assert len(built) == 2
