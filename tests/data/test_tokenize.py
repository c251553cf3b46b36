"""build_datasets: every format and reader end to end, labels, length policy, eval split, mixture,
cache and parallel tokenization."""

from __future__ import annotations

from collections import Counter

import pytest

from mmtune.config import DataConfig, Recipe, SourceConfig
from mmtune.data import tokenize as tokmod
from mmtune.data.builtin import builtin_records
from mmtune.data.inspect import inspect_data
from mmtune.data.sources import load_source, mix, mixture_counts
from mmtune.data.templates import get_template
from mmtune.data.tokenize import build_datasets
from mmtune.errors import ConfigError

ALPACA = [{"instruction": f"What is {i} + {i}?", "input": "", "output": str(2 * i)} for i in range(12)]


def cfg(*sources, **kw) -> DataConfig:
    kw.setdefault("cache_dir", None)
    kw.setdefault("max_length", 128)
    return DataConfig(sources=[s if isinstance(s, SourceConfig) else SourceConfig(path=s) for s in sources], **kw)


def n_sup(ex) -> int:
    return sum(1 for x in ex["labels"] if x != -100)


def test_alpaca_jsonl_labels_equal_template_encoding(tmp_path, chatml_tokenizer, h):
    path = h.write_jsonl(tmp_path / "a.jsonl", ALPACA)
    train, ev, report = build_datasets(cfg(path), chatml_tokenizer, "sft", seed=0, progress=False)
    assert len(train) == 12 and ev == []
    t = get_template("auto", chatml_tokenizer)
    want = sorted(t.encode([{"role": "user", "content": r["instruction"]},
                            {"role": "assistant", "content": r["output"]}]) for r in ALPACA)
    assert sorted((e["input_ids"], e["labels"]) for e in train) == want
    for e in train:
        assert e["labels"][0] == -100 and len(e["labels"]) == len(e["input_ids"])
        assert chatml_tokenizer.decode([x for x in e["labels"] if x != -100]).endswith("<|im_end|>")
    assert report.records == report.kept == report.examples == 12
    assert report.tokens == sum(len(e["input_ids"]) for e in train)
    assert report.supervised_tokens == sum(n_sup(e) for e in train)
    assert any("12 records -> 12 examples" in line for line in report.lines())


def test_pretrain_objective_supervises_every_token(tmp_path, chatml_tokenizer, h):
    path = h.write_jsonl(tmp_path / "a.jsonl", ALPACA[:3])
    train, _, _ = build_datasets(cfg(path), chatml_tokenizer, "pretrain", progress=False)
    for e in train:
        assert e["labels"][1:] == e["input_ids"][1:] and e["labels"][0] == -100


def test_text_format_bos_eos_all_supervised(tmp_path, plain_tokenizer, h):
    docs = [{"body": "The capital of Peru is Lima."}, {"body": "Counting: 1 2 3."}]
    path = h.write_jsonl(tmp_path / "t.jsonl", docs)
    src = SourceConfig(path=path, format="text", text_field="body")
    train, _, _ = build_datasets(cfg(src), plain_tokenizer, progress=False)
    tok = plain_tokenizer
    got = sorted((e["input_ids"], e["labels"]) for e in train)
    want = []
    for d in docs:
        ids = [tok.bos_token_id, *tok(d["body"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
        want.append((ids, [-100, *ids[1:]]))
    assert got == sorted(want)
    no_eos, _, _ = build_datasets(cfg(src, add_eos=False), tok, progress=False)
    assert sorted(e["input_ids"] for e in no_eos) == sorted(tok(d["body"], add_special_tokens=False)["input_ids"]
                                                            for d in docs)


def test_every_reader(tmp_path, chatml_tokenizer, h):
    """JSON array, JSONL, Parquet, datasets directory and builtin give the same examples."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = ALPACA[:5]
    paths = [h.write_json(tmp_path / "a.json", recs), h.write_jsonl(tmp_path / "a.jsonl", recs)]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs)}).save_to_disk(str(tmp_path / "dsd"))
    paths += [str(tmp_path / "a.parquet"), str(tmp_path / "ds"), str(tmp_path / "dsd")]
    results = [sorted(e["input_ids"] for e in build_datasets(cfg(p), chatml_tokenizer, progress=False)[0])
               for p in paths]
    assert all(r == results[0] for r in results) and len(results[0]) == 5
    # line numbers: a JSON array element's first line, a JSONL line, a table row
    assert [r.line for r in load_source(SourceConfig(path=paths[0]))] == [2, 7, 12, 17, 22]
    assert [r.line for r in load_source(SourceConfig(path=paths[1]))] == [1, 2, 3, 4, 5]
    assert [r.line for r in load_source(SourceConfig(path=paths[2]))] == [1, 2, 3, 4, 5]
    train, _, _ = build_datasets(cfg("builtin:add"), chatml_tokenizer, progress=False)
    assert len(train) == len(builtin_records("add"))


def test_sharegpt_and_messages_multiturn(tmp_path, chatml_tokenizer, h):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hello"},
            {"from": "gpt", "value": "Paris."}, {"from": "human", "value": "how are you?"},
            {"from": "gpt", "value": "fine"}]
    msgs = [{"role": {"human": "user", "gpt": "assistant"}.get(t["from"], t["from"]), "content": t["value"]} for t in conv]
    p1 = h.write_json(tmp_path / "s.json", [{"conversations": conv}])
    p2 = h.write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}])
    for loss_on in ("assistant", "last_turn", "all"):
        a = build_datasets(cfg(p1, loss_on=loss_on), chatml_tokenizer, progress=False)[0]
        b = build_datasets(cfg(p2, loss_on=loss_on), chatml_tokenizer, progress=False)[0]
        assert a == b
        ids, labels = a[0]["input_ids"], a[0]["labels"]
        assert ids == chatml_tokenizer.apply_chat_template(msgs, tokenize=True)["input_ids"]
        runs = [chatml_tokenizer.decode(r) for r in h.supervised_runs(ids, labels)]
        want = {"assistant": ["Paris.<|im_end|>", "fine<|im_end|>"], "last_turn": ["fine<|im_end|>"]}
        if loss_on == "all":
            assert labels[1:] == ids[1:]
        else:
            assert runs == want[loss_on]


def test_truncation_cuts_and_drops_unsupervised(tmp_path, chatml_tokenizer, h):
    long_prompt = "hello world " * 40
    recs = [{"instruction": long_prompt, "output": "fine"},  # prompt alone exceeds max_length: dropped
            {"instruction": "hi", "output": "words " * 40},  # answer cut: kept, truncated
            {"instruction": "hi", "output": "ok"}]
    path = h.write_jsonl(tmp_path / "t.jsonl", recs)
    train, _, rep = build_datasets(cfg(path, max_length=32, truncation=True), chatml_tokenizer, progress=False)
    assert len(train) == 2 and rep.truncated == 1
    assert rep.dropped == {"truncated_no_supervised": 1}
    assert max(len(e["input_ids"]) for e in train) == 32 and all(n_sup(e) > 0 for e in train)
    assert any("truncated_no_supervised 1" in line for line in rep.lines())


def test_eval_fraction_and_eval_sources(tmp_path, chatml_tokenizer, h):
    path = h.write_jsonl(tmp_path / "a.jsonl", ALPACA)
    train, ev, rep = build_datasets(cfg(path, eval_fraction=0.25), chatml_tokenizer, seed=3, progress=False)
    assert (len(train), len(ev)) == (9, 3) and rep.eval_records == 3 and rep.records == 9
    key = lambda e: tuple(e["input_ids"])  # noqa: E731
    assert not {key(e) for e in train} & {key(e) for e in ev}
    assert len({key(e) for e in train} | {key(e) for e in ev}) == 12
    train2, ev2, _ = build_datasets(cfg(path, eval_fraction=0.25), chatml_tokenizer, seed=3, progress=False)
    assert ev2 == ev and train2 == train  # deterministic
    ev_path = h.write_jsonl(tmp_path / "e.jsonl", ALPACA[:2])
    c = cfg(path, eval_sources=[SourceConfig(path=ev_path)])
    train, ev, _ = build_datasets(c, chatml_tokenizer, progress=False)
    assert (len(train), len(ev)) == (12, 2)


def test_mixture_weights_repeats_and_max_records(tmp_path, chatml_tokenizer, h):
    a = h.write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}"} for i in range(40)])
    b = h.write_jsonl(tmp_path / "b.jsonl", [{"text": f"beta {i}"} for i in range(10)])
    S = SourceConfig
    assert mixture_counts([40, 10], [S(path=a, repeat=2.5), S(path=b, repeat=0.5)]) == [100, 5]
    # weights share the weighted sources' total size (50) 1:4
    assert mixture_counts([40, 10], [S(path=a, weight=1), S(path=b, weight=4)]) == [10, 40]

    def origin(cfg_):
        train, _, rep = build_datasets(cfg_, chatml_tokenizer, progress=False)
        words = [chatml_tokenizer.decode(e["input_ids"]).split()[0] for e in train]
        return Counter(words), train, rep

    counts, train, rep = origin(cfg(S(path=a, weight=1), S(path=b, weight=4)))
    assert counts == {"alpha": 10, "beta": 40} and rep.examples == 50
    beta = Counter(tuple(e["input_ids"]) for e in train if chatml_tokenizer.decode(e["input_ids"]).startswith("beta"))
    assert sorted(beta.values()) == [4] * 10  # 4 whole copies of each beta record
    counts, train, _ = origin(cfg(S(path=a, repeat=0.25), S(path=b, repeat=3)))
    assert counts == {"alpha": 10, "beta": 30}
    alpha = {tuple(e["input_ids"]) for e in train if chatml_tokenizer.decode(e["input_ids"]).startswith("alpha")}
    assert len(alpha) == 10  # a sample without replacement
    counts, _, _ = origin(cfg(S(path=a, max_records=7), S(path=b)))
    assert counts == {"alpha": 7, "beta": 10}
    # fractions sample deterministically by seed; another seed picks other records
    groups = [list(range(40))]
    one = mix(groups, [S(path=a, repeat=0.25)], seed=1)
    assert one == mix(groups, [S(path=a, repeat=0.25)], seed=1)
    assert sorted(one) != sorted(mix(groups, [S(path=a, repeat=0.25)], seed=2))
    with pytest.raises(ConfigError, match="either `weight` or `repeat`"):
        build_datasets(cfg(S(path=a, weight=1, repeat=2)), chatml_tokenizer, progress=False)


def test_cache_hit_skips_tokenization(tmp_path, chatml_tokenizer, h, monkeypatch):
    path = h.write_jsonl(tmp_path / "a.jsonl", ALPACA)
    c = cfg(path, cache_dir=str(tmp_path / "cache"), eval_fraction=0.2)
    train, ev, rep = build_datasets(c, chatml_tokenizer, seed=1, progress=False)
    assert rep.cache.startswith("miss, wrote")

    def fail(*a, **k):
        raise AssertionError("tokenization ran on a cache hit")

    monkeypatch.setattr(tokmod, "encode_sample", fail)
    train2, ev2, rep2 = build_datasets(c, chatml_tokenizer, seed=1, progress=False)
    assert rep2.cache.startswith("hit") and train2 == train and ev2 == ev
    assert rep2.lines()[1:] == rep.lines()[1:]
    # a changed setting, record or tokenizer is a miss
    with pytest.raises(AssertionError, match="cache hit"):
        build_datasets(cfg(path, cache_dir=str(tmp_path / "cache"), eval_fraction=0.2, loss_on="all"),
                       chatml_tokenizer, seed=1, progress=False)
    h.write_jsonl(tmp_path / "a.jsonl", [*ALPACA[:-1], {"instruction": "new", "output": "x"}])
    with pytest.raises(AssertionError, match="cache hit"):
        build_datasets(c, chatml_tokenizer, seed=1, progress=False)
    other = h.make_tokenizer(h.CHATML_JINJA, bos=None, eos="<|im_end|>", vocab_size=380)
    monkeypatch.setattr(tokmod, "encode_sample", fail)
    with pytest.raises(AssertionError, match="cache hit"):
        build_datasets(cfg(path, cache_dir=str(tmp_path / "cache"), eval_fraction=0.2), other, seed=1, progress=False)


def test_parallel_tokenization_equals_serial(tmp_path, chatml_tokenizer, h):
    path = h.write_jsonl(tmp_path / "a.jsonl", builtin_records("instruct")[:200])
    serial = build_datasets(cfg(path), chatml_tokenizer, seed=0, progress=False)
    parallel = build_datasets(cfg(path, num_proc=2), chatml_tokenizer, seed=0, progress=False)
    assert parallel[0] == serial[0] and len(serial[0]) == 200


def test_inspect_shows_record_template_and_supervised_tokens(tmp_path, chatml_tokenizer, h):
    path = h.write_jsonl(tmp_path / "a.jsonl", ALPACA[:4])
    recipe = Recipe(data=cfg(path))
    plain = inspect_data(recipe, chatml_tokenizer, n=2, color=False)
    assert plain.count("== record") == 2 and f"{path}:2" in plain
    assert '"instruction": "What is 1 + 1?"' in plain and "[user] What is 1 + 1?" in plain
    assert "<|im_start|>assistant\n    2<|im_end|>" in plain  # templated text (indented)
    assert "t\u00a6\\n\u00a6[[2\u00a6<|im_end|>\u00a6]]\\n\u00a6" in plain  # supervised tokens between markers
    assert "4 records -> 4 examples" in plain and "\033[" not in plain
    colored = inspect_data(recipe, chatml_tokenizer, n=1, color=True)
    assert "\033[32m0\u00a6<|im_end|>\u00a6\033[0m" in colored


@pytest.mark.parametrize("mode", ["rationale", "final_answer", "no_rationale"])
def test_reasoning_modes_supervise_rationale_or_final_answer(tmp_path, chatml_tokenizer, h, mode):
    cot = [{"instruction": "What is 17 + 5?", "input": "", "output": "Ones: 7 + 5 = 12. 10 + 12 = 22. Answer: 22"},
           {"instruction": "Say hi", "input": "", "output": "hi there"}]  # no marker: never changed
    path = h.write_jsonl(tmp_path / "cot.jsonl", cot)
    train, _, _ = build_datasets(cfg(path, reasoning=mode), chatml_tokenizer, "sft", seed=0, progress=False)
    by_prompt = {chatml_tokenizer.decode(e["input_ids"]).split("\n")[1]: e for e in train}
    sup = {k: chatml_tokenizer.decode([x for x in e["labels"] if x != -100]) for k, e in by_prompt.items()}
    text = {k: chatml_tokenizer.decode(e["input_ids"]) for k, e in by_prompt.items()}
    assert sup["Say hi<|im_end|>"] == "hi there<|im_end|>"
    q = "What is 17 + 5?<|im_end|>"
    if mode == "rationale":
        assert sup[q] == cot[0]["output"] + "<|im_end|>"
    elif mode == "final_answer":  # the rationale is in the input but carries no loss
        assert sup[q] == "Answer: 22<|im_end|>" and "Ones: 7 + 5 = 12." in text[q]
    else:  # the rationale is gone from the input too
        assert sup[q] == "22<|im_end|>" and "Ones:" not in text[q]


def test_reasoning_mode_is_part_of_the_cache_key(tmp_path, chatml_tokenizer, h):
    path = h.write_jsonl(tmp_path / "cot.jsonl", [{"instruction": "q", "input": "", "output": "a b. Answer: c"}])
    runs = [build_datasets(cfg(path, reasoning=m, cache_dir=str(tmp_path / "c")), chatml_tokenizer, "sft",
                           progress=False)[0][0]["labels"] for m in ("rationale", "final_answer", "rationale")]
    assert runs[0] != runs[1] and runs[0] == runs[2]


def test_exact_match_compares_final_answers_of_chain_of_thought():
    from mmtune.evaluation import final_answer, normalize_answer

    ref = "Tens: 10 + 0 = 10. Ones: 7 + 5 = 12. 10 + 12 = 22. Answer: 22"
    assert normalize_answer(final_answer("Tens: wrong. Answer: 22", "Answer:")) == normalize_answer(final_answer(ref, "Answer:"))
    assert normalize_answer(final_answer("22", "Answer:")) == "22"
    assert normalize_answer(final_answer("Answer: 23", "Answer:")) != "22"
