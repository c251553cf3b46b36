"""Multimodal data: LLaVA and OpenAI-style records give the same tokens, media paths are confined
to the data root, missing / corrupt media are errors naming the record (or counted under skip),
tags must match the media, and built-in sources are deterministic."""

import base64
import json

import pytest
import torch

from mmtune.data.templates import get_template
from mmtune.errors import DataError
from mmtune.multimodal.config import MMSourceConfig
from mmtune.multimodal.data import LengthPolicy, build_mm_examples, builtin_source, normalize_mm_record
from mmtune.multimodal.model import tiny_composed
from mmtune.multimodal.synthetic_audio import speak
from mmtune.multimodal.synthetic_images import make_shapes_dataset


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_composed(cache_root=tmp_path_factory.mktemp("cache"))


@pytest.fixture()
def root(tmp_path):
    d = tmp_path / "data"
    (d / "img").mkdir(parents=True)
    for i, rec in enumerate(make_shapes_dataset(2, seed=0, size=64)):
        rec["image"].save(d / "img" / f"{i}.png")
    speak("seven two", d / "a.wav", voice="tone-3", engine="procedural")
    return d


def _write(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _build(model, path, **kw):
    template = get_template("auto", model.tokenizer)
    return build_mm_examples([MMSourceConfig(path=str(path), **kw.pop("src", {}))], model, template,
                             LengthPolicy(512, False), **kw)


def llava(rid, image="img/0.png", audio=None, text="<image>\nWhat color is the circle?"):
    rec = {"id": rid, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "red"}]}
    if image is not None:
        rec["image"] = image
    if audio is not None:
        rec["audio"] = audio
    return rec


def test_llava_and_openai_records_give_identical_examples(model, root):
    png = (root / "img" / "1.png").read_bytes()
    wav = (root / "a.wav").read_bytes()
    _write(root / "llava.jsonl", [llava("a", text="<image>\n<audio>\nWhat color is the circle?", audio="a.wav"),
                                  llava("b", image="img/1.png", text="What color is the circle?")])
    _write(root / "openai.jsonl", [
        {"id": "a", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/0.png"}},
                                         {"type": "input_audio", "input_audio": {"path": "a.wav"}},
                                         {"type": "text", "text": "What color is the circle?"}]},
            {"role": "assistant", "content": "red"}]},
        {"id": "b", "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}},
                {"type": "text", "text": "What color is the circle?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]},
        {"id": "c", "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {
                "data": base64.b64encode(wav).decode(), "format": "wav"}}, {"type": "text", "text": "Digits?"}]},
            {"role": "assistant", "content": "7 2"}]}])
    a, rep_a = _build(model, root / "llava.jsonl")
    b, rep_b = _build(model, root / "openai.jsonl")
    by_id = {e["id"]: e for e in b}
    for ex in a:
        other = by_id[ex["id"]]
        assert ex["input_ids"] == other["input_ids"] and ex["labels"] == other["labels"]
        assert [torch.equal(x.pixels, y.pixels) for x, y in zip(ex["images"], other["images"])] == [True]
    assert by_id["a"]["group"] == "image+audio" and by_id["b"]["group"] == "image" and by_id["c"]["group"] == "audio"
    # a LLaVA record with an image and no tag gets "<image>\n" at the start of its first user turn
    assert {e["id"]: e for e in a}["b"]["input_ids"] == by_id["b"]["input_ids"]
    assert rep_b.groups == {"image+audio": 1, "image": 1, "audio": 1}
    assert rep_b.media_tokens == sum(x.num_tokens for e in b for x in e["images"] + e["audios"])


@pytest.mark.parametrize("bad,reason", [("../outside.png", "path_escape"), ("img/../../outside.png", "path_escape"),
                                        ("/etc/passwd", "path_escape"), ("http://x.org/a.png", "remote_url"),
                                        ("img/missing.png", "missing_file")])
def test_paths_are_confined_to_the_data_root(model, root, bad, reason):
    (root.parent / "outside.png").write_bytes((root / "img" / "0.png").read_bytes())
    path = _write(root / "d.jsonl", [llava("ok"), llava("rec-7", image=bad)])
    with pytest.raises(DataError) as e:
        _build(model, path)
    assert e.value.reason == reason and e.value.line == 2 and e.value.field == "image"
    assert f"{path}:2 field 'image': record 'rec-7'" in str(e.value)
    ex, report = _build(model, path, on_bad_record="skip")
    assert [x["id"] for x in ex] == ["ok"] and report.dropped == {reason: 1}


def test_symlink_out_of_the_root_is_rejected(model, root):
    (root.parent / "secret.png").write_bytes((root / "img" / "0.png").read_bytes())
    (root / "img" / "link.png").symlink_to(root.parent / "secret.png")
    path = _write(root / "d.jsonl", [llava("s", image="img/link.png")])
    with pytest.raises(DataError, match="escapes the data root"):
        _build(model, path)


def test_data_root_option_and_corrupt_media_name_the_record(model, root, tmp_path):
    (root / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "bad.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    elsewhere = _write(tmp_path / "meta.jsonl", [llava("fine"), llava("broken-1", image="img/bad.png"),
                                                 llava("broken-2", image=None, audio="bad.wav",
                                                       text="<audio>\nDigits?")])
    with pytest.raises(DataError) as e:
        _build(model, elsewhere, src={"data_root": str(root)})
    msg = str(e.value)
    assert e.value.reason == "corrupt_image" and f"{elsewhere}:2" in msg and "record 'broken-1'" in msg
    assert "bad.png" in msg and "cannot be decoded" in msg
    ex, report = _build(model, elsewhere, src={"data_root": str(root)}, on_bad_record="skip")
    assert [x["id"] for x in ex] == ["fine"]
    assert report.dropped == {"corrupt_image": 1, "corrupt_audio": 1}


def test_tags_must_match_the_media(model, root):
    path = _write(root / "d.jsonl", [llava("two-tags", text="<image>\n<image>\nCompare.")])
    with pytest.raises(DataError, match="2 <image> tag\\(s\\) but the record has 1 image") as e:
        _build(model, path)
    assert e.value.reason == "tag_mismatch"
    path = _write(root / "d2.jsonl", [llava("inj", text=f"<image>\nIs {model.image_token} special?")])
    with pytest.raises(DataError, match="must not contain the reserved token"):
        _build(model, path)


def test_openai_media_checks(root):
    with pytest.raises(DataError, match="only base64 data URLs") as e:
        normalize_mm_record({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]},
            {"role": "assistant", "content": "x"}]}, "openai", root)
    assert e.value.field == "messages[0].content[0].image_url"
    with pytest.raises(DataError, match="unsupported type 'video'"):
        normalize_mm_record({"messages": [{"role": "user", "content": [{"type": "video"}]},
                                          {"role": "assistant", "content": "x"}]}, "auto", root)


def test_builtin_sources_are_deterministic(tmp_path):
    a = builtin_source("shapes-vqa", 5, 0, tmp_path / "a")
    b = builtin_source("shapes-vqa", 5, 0, tmp_path / "b")
    assert a.read_text() == b.read_text()
    assert (a.parent / "images" / "00003.png").read_bytes() == (b.parent / "images" / "00003.png").read_bytes()
    ev = builtin_source("shapes-vqa-eval", 5, 0, tmp_path / "a")
    assert ev.read_text() != a.read_text()
    sv = [json.loads(x) for x in builtin_source("shapes-spoken-vqa", 3, 0, tmp_path / "a").read_text().splitlines()]
    assert all(r["conversations"][0]["value"].startswith("<image>\n<audio>\n") for r in sv)
    with pytest.raises(Exception, match="unknown built-in multimodal source"):
        builtin_source("shapes", 5, 0, tmp_path)


def _png(width, height, rows: int) -> bytes:
    """A 1-bit greyscale PNG of ``width x height`` whose IDAT holds ``rows`` zero rows: with
    rows == height a real decompression bomb (30000 x 30000 is ~110 kB on disk, 900 Mpx)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(rows)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("size", [(30000, 30000), (9000, 8000)])  # beyond PIL's own guard / only beyond ours
def test_decompression_bomb_is_a_bad_record(model, root, size):
    from mmtune.multimodal.data import MAX_IMAGE_PIXELS

    w, h = size
    (root / "img" / "bomb.png").write_bytes(_png(w, h, rows=h if w == 30000 else 8))
    path = _write(root / "d.jsonl", [llava("ok"), llava("bomb-1", image="img/bomb.png")])
    with pytest.raises(DataError) as e:
        _build(model, path)
    msg = str(e.value)
    assert e.value.reason == "image_too_large" and e.value.line == 2 and "\n" not in msg
    assert f"{path}:2 field 'image': record 'bomb-1'" in msg and f"{w * h:,} pixels" in msg
    assert f"{MAX_IMAGE_PIXELS:,}" in msg and w * h > MAX_IMAGE_PIXELS == 64 * 1024 * 1024
    ex, report = _build(model, path, on_bad_record="skip")
    assert [x["id"] for x in ex] == ["ok"] and report.dropped == {"image_too_large": 1}


def test_hostile_json_in_multimodal_records(model, root):
    lines = [json.dumps(llava("ok")), '{"id": "deep", "conversations": ' + "[" * 100_000 + "]" * 100_000 + "}",
             json.dumps(llava("s")).replace("What color", "What \\ud800 color")]
    path = root / "h.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        _build(model, path)
    assert (e.value.reason, e.value.line) == ("nested_too_deep", 2)
    ex, report = _build(model, path, on_bad_record="skip")
    assert [x["id"] for x in ex] == ["ok"] and report.dropped == {"nested_too_deep": 1, "lone_surrogate": 1}
