"""Multimodal packing: packed and unpacked batches give the same loss (fp32, <= 1e-5) and the same
per-sample logits, media stay attached to their samples, and truncation never cuts a
placeholder run (such samples are dropped and counted)."""

import json

import pytest
import torch

from mmtune.data.templates import get_template
from mmtune.errors import DataError
from mmtune.multimodal.config import MMSourceConfig
from mmtune.multimodal.data import (
    TRUNCATION_CUTS_PLACEHOLDER,
    LengthPolicy,
    build_mm_examples,
    collate_mm,
    encode_mm_sample,
    pack_mm_examples,
)
from mmtune.multimodal.model import tiny_composed
from mmtune.multimodal.objective import MultimodalObjective, model_batch
from mmtune.multimodal.synthetic_audio import procedural_speech
from mmtune.multimodal.synthetic_images import make_ocr_dataset, make_shapes_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_composed(cache_root=tmp_path_factory.mktemp("cache")).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n or "projector" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, get_template("auto", model.tokenizer)


def _examples(model, template):
    shapes = make_shapes_dataset(4, seed=2, size=64)
    wide = make_ocr_dataset(2, seed=2, size=64, wide=True)
    clips = ["one", "two three", "nine nine nine", "four"]
    specs = [([shapes[0]["image"]], [], shapes[0]["question"], shapes[0]["answer"]),
             ([], [clips[0]], "Transcribe the digits.", "1"),
             ([], [], "What is 3 + 4?", "7"),
             ([wide[0]["image"]], [], "What is written in the image?", wide[0]["answer"]),
             ([shapes[1]["image"]], [clips[1]], "Answer.", shapes[1]["answer"]),
             ([], [clips[2]], "Transcribe the digits.", "9 9 9"),
             ([shapes[2]["image"], shapes[3]["image"]], [], "Compare them.", "the first has more shapes"),
             ([], [], "Reverse the words: red cat sun", "sun cat red"),
             ([wide[1]["image"]], [clips[3]], "Read and listen.", wide[1]["answer"] + " 4")]
    out = []
    for images, audios, q, a in specs:
        sample = {"messages": [{"role": "user", "content": "<image>\n" * len(images) + "<audio>\n" * len(audios) + q},
                              {"role": "assistant", "content": a}]}
        ims = [model.process_image(im) for im in images]
        aus = [model.process_audio(procedural_speech(c, voice="tone-4")) for c in audios]
        out.append(encode_mm_sample(sample, ims, aus, model, template, LengthPolicy(1024, False)))
    return out


def test_packed_and_unpacked_losses_are_equal(setup):
    model, template = setup
    examples = _examples(model, template)
    rows = pack_mm_examples(examples, max_length=320)
    assert len(rows) < len(examples)  # several samples share a row
    assert all(len(r["input_ids"]) <= 320 for r in rows)
    assert {r["group"] for r in rows} == {"text", "image", "audio", "image+audio"}
    for r in rows:  # media follow their samples, in order
        assert [id(x) for x in r["images"]] == [id(x) for i in r["indices"] for x in examples[i]["images"]]
        assert [id(x) for x in r["audios"]] == [id(x) for i in r["indices"] for x in examples[i]["audios"]]
    pad = model.tokenizer.pad_token_id
    objective = MultimodalObjective()
    with torch.no_grad():
        packed = objective(model, collate_mm(rows, pad))
        unpacked = objective(model, collate_mm(examples, pad))
        alone = [objective(model, collate_mm([e], pad)) for e in examples]
    assert packed.count == unpacked.count == sum(a.count for a in alone)
    total = sum(float(a.loss_sum) for a in alone)
    assert abs(float(packed.loss_sum) - float(unpacked.loss_sum)) <= 1e-5 * abs(total)
    assert abs(float(packed.loss_sum) - total) <= 1e-5 * abs(total)
    assert abs(float(packed.loss_sum) / packed.count - float(unpacked.loss_sum) / unpacked.count) <= 1e-5


def test_packed_logits_equal_each_sample_alone(setup):
    model, template = setup
    examples = _examples(model, template)
    rows = pack_mm_examples(examples, max_length=320)
    pad = model.tokenizer.pad_token_id
    worst = 0.0
    with torch.no_grad():
        for row in rows:
            g = collate_mm([row], pad)["groups"][0]
            logits = model(**model_batch(g)).logits[0]  # (T, V)
            start = 0
            for i, n in zip(row["indices"], row["lengths"]):
                solo = model(**model_batch(collate_mm([examples[i]], pad)["groups"][0])).logits[0]
                worst = max(worst, float((logits[start:start + n] - solo).abs().max()))
                start += n
    assert worst <= 1e-5


def test_truncation_never_cuts_a_placeholder_run(setup, tmp_path):
    model, template = setup
    img = make_shapes_dataset(1, seed=0, size=64)[0]["image"]
    img.save(tmp_path / "a.png")
    long_q = " ".join(["red"] * 60)
    recs = [
        # image run (41 tokens) starts near the end: a cut at max_length would split it -> dropped
        {"id": "cut-run", "image": "a.png", "conversations": [
            {"from": "human", "value": long_q + "\n<image>"}, {"from": "gpt", "value": "blue"}]},
        # image first, long answer: the cut falls after the run -> kept, truncated
        {"id": "cut-after", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nSay it."}, {"from": "gpt", "value": long_q}]},
        {"id": "short", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "red"}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    full = {r["id"]: r for r in recs}
    n_img = model.process_image(img).num_tokens
    src = [MMSourceConfig(path=str(path))]
    policy = LengthPolicy(max_length=90, truncation=True)
    examples, report = build_mm_examples(src, model, template, policy)
    kept = {e["id"]: e for e in examples}
    assert set(kept) == {"cut-after", "short"} and report.dropped == {TRUNCATION_CUTS_PLACEHOLDER: 1}
    assert len(kept["cut-after"]["input_ids"]) == 90 and kept["cut-after"]["input_ids"].count(
        model.image_token_id) == n_img
    assert "truncation_cuts_placeholder 1" in "\n".join(report.lines())
    # the dropped sample's run really crosses the limit
    ex = encode_mm_sample({"messages": [{"role": "user", "content": full["cut-run"]["conversations"][0]["value"]},
                                        {"role": "assistant", "content": "blue"}]},
                          [model.process_image(img)], [], model, template, LengthPolicy(10_000, False))
    first = ex["input_ids"].index(model.image_token_id)
    assert first < 90 < first + n_img
    # without truncation an overlong sample is a bad record
    with pytest.raises(DataError, match="longer than data.max_length 90") as e:
        build_mm_examples(src, model, template, LengthPolicy(max_length=90, truncation=False))
    assert e.value.reason == "too_long" and e.value.line == 1
