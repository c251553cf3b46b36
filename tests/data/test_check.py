"""`mmtune data inspect FILE` and `mmtune data check FILE_OR_RECIPE`: data files are read directly,
every record is checked with per-reason counts, and the exit status says whether the data is clean
(for CI)."""

from __future__ import annotations

import json

import pytest

from mmtune.cli import main

GOOD = {"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}]}
BAD_LINES = [  # (reason, line) of every kind that `check` must count
    ("malformed_json", b'{"messages": [{"role": "user", '),
    ("unknown_role", json.dumps({"messages": [{"role": "user", "content": "a"},
                                              {"role": "robot", "content": "b"}]}).encode()),
    ("non_utf8", b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}'),
    ("lone_surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}'),
    ("nested_too_deep", b'{"a": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("too_long", json.dumps({"messages": [{"role": "user", "content": "hello world " * 60},
                                          {"role": "assistant", "content": "x"}]}).encode()),
]


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory, chatml_tokenizer):
    d = tmp_path_factory.mktemp("tok")
    chatml_tokenizer.save_pretrained(d)
    return str(d)


def _write(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _good(n: int) -> list[bytes]:
    return [json.dumps(GOOD).encode()] * n


def test_inspect_reads_a_data_file_and_exits_1_when_it_stops(tmp_path, tokdir, capsys):
    good = _write(tmp_path / "good.jsonl", _good(3))
    assert main(["data", "inspect", good, "--model", tokdir, "--template", "chatml", "--no-color", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "template: chatml" in out and f"== record 1: {good}:1 ==" in out and "[user] What is 1 + 1?" in out
    assert "3 records -> 3 examples" in out
    for reason, line in BAD_LINES[:4]:
        bad = _write(tmp_path / f"{reason}.jsonl", [*_good(2), line])
        assert main(["data", "inspect", bad, "--model", tokdir, "--template", "chatml", "--no-color"]) == 1
        cap = capsys.readouterr()
        err = cap.err.strip()
        assert err.startswith("mmtune: data inspect stopped: ") and f"{reason}.jsonl:3" in err
        assert "\n" not in err and "Traceback" not in cap.out + cap.err
    # the default tokenizer is builtin:tiny's, and an override applies to the default recipe
    assert main(["data", "inspect", good, "data.max_length=9", "--no-color"]) == 1
    assert "longer than data.max_length 9" in capsys.readouterr().err


def test_non_utf8_targets_are_one_line(tmp_path, tokdir, capsys):
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes("\n".join(json.dumps(GOOD, ensure_ascii=False) for _ in range(2)).replace("1 + 1", "caf\u00e9")
                      .encode("latin-1") + b"\n")
    assert main(["data", "inspect", str(latin), "--model", tokdir, "--no-color"]) == 1
    err = capsys.readouterr().err
    assert "latin1.jsonl:1: bytes are not valid UTF-8 (byte 0xe9" in err and len(err.strip().splitlines()) == 1
    array = tmp_path / "latin1.json"
    array.write_bytes(b"[" + latin.read_bytes().replace(b"\n", b",", 1).rstrip(b"\n") + b"]")
    assert main(["data", "check", str(array), "--model", tokdir]) == 1
    assert "latin1.json:1: bytes are not valid UTF-8" in capsys.readouterr().out
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"data:\n  template: caf\xe9\n")
    assert main(["data", "inspect", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "r.yaml: not UTF-8 text" in err and len(err.strip().splitlines()) == 1


def test_check_counts_every_bad_record_per_reason(tmp_path, tokdir, capsys):
    lines = _good(5)
    for k, (_, line) in enumerate(BAD_LINES):
        lines += [line] * (1 + (k == 1))  # two unknown_role
    path = _write(tmp_path / "mixed.jsonl", lines)
    opts = ["--model", tokdir, "--template", "chatml"]
    argv = ["data", "check", path, "data.max_length=64", *opts]
    assert main(argv) == 1
    out = capsys.readouterr().out.splitlines()
    counts = "unknown_role 2, lone_surrogate 1, malformed_json 1, nested_too_deep 1, non_utf8 1, too_long 1"
    assert out[0] == "check: every record, template chatml, max_length 64"
    assert out[1] == f"  train {path}: 12 records, 5 ok, 7 bad ({counts})"
    assert out[-1] == f"bad records: 7 of 12 ({counts})"
    examples = [ln for ln in out if ln.startswith("    e.g. ")]
    assert len(examples) == 6 and any(e.startswith(f"    e.g. too_long: {path}:12: sample is") for e in examples)
    assert main([*argv, "--allow-bad"]) == 0
    capsys.readouterr()
    # max_records and on_bad_record: skip do not hide anything from a check
    assert main([*argv[:4], "data.sources.0.max_records=2", "data.on_bad_record=skip", *opts]) == 1
    assert capsys.readouterr().out.splitlines()[1] == out[1]
    clean = _write(tmp_path / "clean.jsonl", _good(4))
    assert main(["data", "check", clean, "--model", tokdir]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "bad records: none of 4"


def test_check_a_recipe_with_eval_sources_and_preference_pairs(tmp_path, tokdir, capsys):
    train = _write(tmp_path / "train.jsonl", [*_good(3), BAD_LINES[1][1]])
    ev = _write(tmp_path / "eval.jsonl", [*_good(2), BAD_LINES[0][1]])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: {tokdir}}}\ndata:\n  sources: [{{path: {train}}}]\n"
                      f"  eval_sources: [{{path: {ev}}}]\n  template: chatml\n")
    assert main(["data", "check", str(recipe)]) == 1
    out = capsys.readouterr().out
    assert f"  train {train}: 4 records, 3 ok, 1 bad (unknown_role 1)" in out
    assert f"  eval {ev}: 3 records, 2 ok, 1 bad (malformed_json 1)" in out and "bad records: 2 of 7" in out
    pair = {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}
    prefs = _write(tmp_path / "prefs.jsonl", [json.dumps(pair).encode(), json.dumps({**pair, "chosen": ""}).encode()])
    assert main(["data", "check", prefs, "--model", tokdir]) == 1  # pairs: objective dpo is inferred
    assert f"  train {prefs}: 2 records, 1 ok, 1 bad (empty_assistant 1)" in capsys.readouterr().out


def test_check_a_multimodal_recipe_loads_every_image(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "img" / "red.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rec = lambda i, img: {"id": i, "image": img, "conversations": [  # noqa: E731
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    data = _write(tmp_path / "mm.jsonl", [json.dumps(rec("a", "img/red.png")).encode(),
                                          json.dumps(rec("b", "img/broken.png")).encode(),
                                          json.dumps(rec("c", "../escape.png")).encode()])
    recipe = tmp_path / "mm.yaml"
    recipe.write_text("model: {path: builtin:tiny}\nmultimodal:\n  vision: {path: builtin:tiny-siglip}\n"
                      f"  stages:\n    - name: align\n      sources: [{{path: {data}}}]\n"
                      "      trainable: {vision_projector: full}\n")
    assert main(["data", "check", str(recipe)]) == 1
    out = capsys.readouterr().out
    assert f"  stage align {data}: 3 records, 1 ok, 2 bad (corrupt_image 1, path_escape 1)" in out
    assert f"{data}:2 field 'image': record 'b': image" in out
    assert main(["data", "check", data]) == 2  # a media file needs the recipe's processors
    assert "holds image/audio records" in capsys.readouterr().err
