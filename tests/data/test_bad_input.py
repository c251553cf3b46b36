"""Bad input: every problem names the file and line; under on_bad_record=skip the records are
dropped and counted per reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmtune.config import DataConfig, SourceConfig
from mmtune.data.sources import BadRecordStats, load_source
from mmtune.data.tokenize import build_datasets
from mmtune.errors import ConfigError, DataError, MMTuneError


def _msgs(user, assistant) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


GOOD = _msgs("What is 1 + 1?", "2")

# (reason -> bad line content); the bad record is written on line 3 of a JSONL file of `messages` records
CASES = {
    "malformed_json": b'{"messages": [{"role": "user", "content": "x"}, ',
    "missing_field": json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}).encode(),
    "unknown_role": json.dumps({"messages": [{"role": "user", "content": "a"},
                                             {"role": "robot", "content": "b"}]}).encode(),
    "empty_assistant": json.dumps(_msgs("a", "")).encode(),
    "non_utf8": b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}',
    "too_long": json.dumps(_msgs("hello world " * 60, "x")).encode(),
}


def _write(path: Path, bad: bytes) -> str:
    lines = [json.dumps(GOOD).encode(), json.dumps(GOOD).encode(), bad, json.dumps(GOOD).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _cfg(path: str, **kw) -> DataConfig:
    return DataConfig(sources=[SourceConfig(path=path)], cache_dir=None, max_length=64, **kw)


@pytest.mark.parametrize("reason", list(CASES))
def test_error_names_file_line_and_problem(tmp_path, chatml_tokenizer, reason):
    path = _write(tmp_path / f"{reason}.jsonl", CASES[reason])
    with pytest.raises(DataError) as e:
        build_datasets(_cfg(path), chatml_tokenizer, progress=False)
    err = e.value
    assert err.reason == reason and err.line == 3
    msg = str(err)
    assert f"{reason}.jsonl:3" in msg and "\n" not in msg
    extra = {"unknown_role": ["'robot'", "allowed: system, user, assistant"], "non_utf8": ["UTF-8", "0xe9"],
             "too_long": ["longer than data.max_length 64"], "malformed_json": ["malformed JSON"],
             "missing_field": ["'content'", "messages[1].content"], "empty_assistant": ["empty"]}[reason]
    for s in extra:
        assert s in msg


@pytest.mark.parametrize("reason", list(CASES))
def test_skip_counts_per_reason(tmp_path, chatml_tokenizer, reason):
    path = _write(tmp_path / f"{reason}.jsonl", CASES[reason])
    train, _, report = build_datasets(_cfg(path, on_bad_record="skip"), chatml_tokenizer, progress=False)
    assert len(train) == 3 and report.dropped == {reason: 1}
    assert any(f"{reason}.jsonl:3" in line for line in report.lines())


def test_skip_many_reasons_in_one_file(tmp_path, chatml_tokenizer):
    lines = [json.dumps(GOOD).encode()]
    for reason in CASES:
        lines += [CASES[reason]] * (2 if reason in ("unknown_role", "too_long") else 1)
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines))
    train, _, report = build_datasets(_cfg(str(path), on_bad_record="skip"), chatml_tokenizer, progress=False)
    assert len(train) == 1
    assert report.dropped == {"malformed_json": 1, "missing_field": 1, "unknown_role": 2, "empty_assistant": 1,
                              "non_utf8": 1, "too_long": 2}
    stats = BadRecordStats()
    load_source(SourceConfig(path=str(path)), on_bad_record="skip", stats=stats)
    assert stats.summary() == ("skipped 6 bad records: unknown_role 2, empty_assistant 1, malformed_json 1, "
                               "missing_field 1, non_utf8 1")  # too_long is found at tokenization


def test_no_supervised_tokens_is_a_bad_record(tmp_path, plain_tokenizer):
    """A one-token document without BOS/EOS has nothing to predict: an error, or counted under skip."""
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "The capital of Peru is Lima."}\n{"text": "L"}\n')
    cfg = DataConfig(sources=[SourceConfig(path=str(path))], cache_dir=None, add_eos=False)
    with pytest.raises(DataError, match=r"docs\.jsonl:2: sample has no supervised token") as e:
        build_datasets(cfg, plain_tokenizer, progress=False)
    assert e.value.reason == "no_supervised_tokens"
    cfg.on_bad_record = "skip"
    train, _, report = build_datasets(cfg, plain_tokenizer, progress=False)
    assert len(train) == 1 and report.dropped == {"no_supervised_tokens": 1}


def test_json_array_errors_name_the_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:3: malformed JSON"):
        load_source(SourceConfig(path=str(p)))
    p.write_text('[\n {"instruction": "a", "output": "b"},\n\n {"instruction": "c"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:4 field 'output': missing field 'output'"):
        load_source(SourceConfig(path=str(p)))
    p.write_bytes(b'[\n {"instruction": "a", "output": "b"},\n {"instruction": "\xff", "output": "d"}\n]\n')
    with pytest.raises(DataError, match=r"bad\.json:3: bytes are not valid UTF-8 \(byte 0xff at column 19\)"):
        load_source(SourceConfig(path=str(p)))


def test_missing_path_and_unknown_names(tmp_path, chatml_tokenizer):
    with pytest.raises(MMTuneError) as e:
        build_datasets(_cfg(str(tmp_path / "nope.jsonl")), chatml_tokenizer, progress=False)
    assert "nope.jsonl" in str(e.value) and "not found" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(MMTuneError, match="unsupported data file type '.csv'"):
        (tmp_path / "x.csv").write_text("a,b\n")
        load_source(SourceConfig(path=str(tmp_path / "x.csv")))
    with pytest.raises(MMTuneError, match="builtin:nope.*valid: corpus"):
        load_source(SourceConfig(path="builtin:nope"))
    with pytest.raises(ConfigError, match="unknown data format 'sharegtp'.*Did you mean 'sharegpt'"):
        load_source(SourceConfig(path="builtin:add", format="sharegtp"))
    with pytest.raises(ConfigError, match="data.sources is empty"):
        build_datasets(DataConfig(), chatml_tokenizer, progress=False)


def test_all_records_bad_is_one_clear_error(tmp_path, chatml_tokenizer):
    path = tmp_path / "all_bad.jsonl"
    path.write_bytes(CASES["empty_assistant"] + b"\n" + CASES["unknown_role"] + b"\n")
    with pytest.raises(MMTuneError, match=r"all_bad\.jsonl has no usable records \(skipped 2 bad records"):
        build_datasets(_cfg(str(path), on_bad_record="skip"), chatml_tokenizer, progress=False)
    path.write_bytes(CASES["too_long"] + b"\n")
    with pytest.raises(MMTuneError, match="no training examples left.*too_long 1"):
        build_datasets(_cfg(str(path), on_bad_record="skip"), chatml_tokenizer, progress=False)


# Hostile input: valid bytes that used to escape as tracebacks (RecursionError from the JSON parser,
# TypeError / UnicodeEncodeError from the tokenizer); now bad records like the others.
DEEP = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
SURROGATE_RECORDS = {  # field -> a record whose only problem is a lone "\ud800" in that field
    "messages[0].content": '{"messages": [{"role": "user", "content": "a\\ud800b"}, '
                           '{"role": "assistant", "content": "x"}]}',
    "messages[1].content": '{"messages": [{"role": "user", "content": "a"}, '
                           '{"role": "assistant", "content": "\\udfff"}]}',
    "messages[0].role": '{"messages": [{"role": "us\\ud800er", "content": "a"}, '
                        '{"role": "assistant", "content": "x"}]}',
    "<key>": '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}], '
             '"\\ud83d": 1}',
    "meta.tags[1]": '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}], '
                    '"meta": {"tags": ["ok", "\\ud800"]}}',
}


def _hostile_cases():
    yield "nested_too_deep", DEEP, None
    for where, line in SURROGATE_RECORDS.items():
        yield "lone_surrogate", line.encode(), where


@pytest.mark.parametrize("reason,bad,where", list(_hostile_cases()),
                         ids=["deep", *(f"surrogate-{w}" for w in SURROGATE_RECORDS)])
def test_hostile_records_are_one_line_errors_or_counted_skips(tmp_path, chatml_tokenizer, reason, bad, where):
    path = _write(tmp_path / "hostile.jsonl", bad)
    with pytest.raises(DataError) as e:
        build_datasets(_cfg(path), chatml_tokenizer, progress=False)
    err = e.value
    assert (err.reason, err.line, err.field) == (reason, 3, where)
    msg = str(err)
    assert "hostile.jsonl:3" in msg and "\n" not in msg and len(msg) < 400
    assert ("nested too deeply" if reason == "nested_too_deep" else "lone UTF-16 surrogate") in msg
    train, _, report = build_datasets(_cfg(path, on_bad_record="skip"), chatml_tokenizer, progress=False)
    assert len(train) == 3 and report.dropped == {reason: 1}


def test_surrogate_pairs_are_text_and_hostile_json_arrays_name_the_line(tmp_path, chatml_tokenizer):
    # A complete pair is one character (U+1F600) and trains as usual; only lone halves are bad.
    ok = tmp_path / "pair.jsonl"
    ok.write_text('{"messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}, '
                  '{"role": "assistant", "content": "ok"}]}\n')
    (rec,) = load_source(SourceConfig(path=str(ok)))
    assert rec.sample["messages"][0]["content"] == "smile \U0001F600"
    arr = tmp_path / "arr.json"
    arr.write_bytes(b'[\n' + json.dumps(GOOD).encode() + b',\n' + SURROGATE_RECORDS["meta.tags[1]"].encode()
                    + b'\n]\n')
    with pytest.raises(DataError, match=r"arr\.json:3 field 'meta\.tags\[1\]': the text holds a lone UTF-16") as e:
        load_source(SourceConfig(path=str(arr)))
    assert e.value.reason == "lone_surrogate"
    assert len(load_source(SourceConfig(path=str(arr)), on_bad_record="skip")) == 1
    arr.write_bytes(b'[\n' + json.dumps(GOOD).encode() + b',\n' + DEEP + b'\n]\n')
    with pytest.raises(DataError, match=r"arr\.json:3: malformed JSON: an element is nested too deeply"):
        load_source(SourceConfig(path=str(arr)))
