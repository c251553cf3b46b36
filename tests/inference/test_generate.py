"""The one generation loop against transformers: greedy tokens equal ``model.generate(do_sample=
False)`` for a causal LM and for a composed model's text route; the KV-cache logits equal a full
forward's at every step (fp32), for a causal LM and for a composed model with an image."""

from __future__ import annotations

import torch

from mmtune.data.templates import get_template
from mmtune.inference.generate import decoder_for, generate_stream, iter_token_ids
from mmtune.multimodal.data import prompt_ids


def _chatml(tok, text):
    return get_template("chatml", tok).prompt_ids([{"role": "user", "content": text}])


def _strip_stop(ref, stops):
    return ref[:-1] if ref and ref[-1] in stops else ref  # generate keeps the stop token; we do not


def test_greedy_equals_transformers_generate_on_a_causal_lm(tiny_lm):
    model, tok = tiny_lm
    for text in ("What is 7 + 12?", "Reverse the words: red cat sun"):
        prompt = _chatml(tok, text)
        ours = list(iter_token_ids(model, prompt, 24, stop_token_ids=[0, 2]))
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=[0, 2],
                             pad_token_id=0)[0, len(prompt):].tolist()
        assert ours == _strip_stop(ref, (0, 2)) and len(set(ours)) >= 5
        assert "".join(generate_stream(model, tok, prompt, 24, stop_token_ids=[0, 2])) == tok.decode(
            ours, skip_special_tokens=True)


def test_greedy_equals_transformers_generate_on_the_composed_text_route(composed):
    model = composed
    template = get_template("auto", model.tokenizer)
    banned = [model.image_token_id, model.audio_token_id]
    stops = template.stop_token_ids
    route = model.router.route("text", n_samples=0)
    for text in ("What is 3 + 4?", "Name a colour."):
        ids = prompt_ids(model, template, [{"role": "user", "content": text}])
        ours = list(iter_token_ids(model, ids, 20, stop_token_ids=stops))
        with torch.no_grad(), model.router.activate(model.language_model, route):
            ref = model.language_model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                                eos_token_id=stops, pad_token_id=0,
                                                suppress_tokens=banned)[0, len(ids):].tolist()
        assert ours == _strip_stop(ref, stops) and len(set(ours)) >= 4


def _incremental(model, prompt, steps, images=()):
    """Greedy tokens and the decoder's logits before each of them."""
    seq, logits_seen = list(prompt), []
    with decoder_for(model, images) as dec:
        logits = dec.prefill(prompt)
        for _ in range(steps):
            logits[list(dec.banned)] = float("-inf")
            logits_seen.append(logits.clone())
            tok = int(logits.argmax())
            seq.append(tok)
            logits = dec.step(tok)
    return seq, logits_seen


def test_kv_cache_logits_equal_full_forward_causal_lm(tiny_lm):
    model, tok = tiny_lm
    prompt = _chatml(tok, "Reverse the words: sun moon star")
    seq, seen = _incremental(model, prompt, 10)
    with torch.no_grad():
        for i, logits in enumerate(seen):
            full = model(input_ids=torch.tensor([seq[:len(prompt) + i]])).logits[0, -1]  # (V,)
            assert torch.allclose(logits, full, atol=5e-5, rtol=0), i  # fp32 rounding: about 1e-5
    assert len(set(seq[len(prompt):])) >= 4


def test_kv_cache_logits_equal_full_forward_composed_with_an_image(composed, image_file):
    from PIL import Image

    model = composed
    template = get_template("auto", model.tokenizer)
    images = [model.process_image(Image.open(image_file).convert("RGB"))]
    prompt = prompt_ids(model, template, [{"role": "user", "content": "<image>\nWhat colour is it?"}], images)
    seq, seen = _incremental(model, prompt, 8, images)
    banned = [model.image_token_id, model.audio_token_id]
    with torch.no_grad():
        for i, logits in enumerate(seen):
            full = model(torch.tensor([seq[:len(prompt) + i]]), images=images).logits[0, -1].clone()  # (V,)
            full[banned] = float("-inf")
            assert torch.allclose(logits, full, atol=5e-5, rtol=0), i  # fp32 rounding: about 1e-5
        # the image matters: the vision route with the image gives other logits than text alone
        text_only = model(torch.tensor([prompt_ids(model, template, [{"role": "user", "content": "What colour is "
                                                                      "it?"}])])).logits[0, -1]
    assert (seen[0][:len(text_only)] - text_only).abs().max() > 1e-3
    assert seq[len(prompt):] == list(iter_token_ids(model, prompt, 8, images=images))


def test_generation_restores_training_mode(tiny_lm, composed):
    model, tok = tiny_lm
    model.train()
    list(iter_token_ids(model, _chatml(tok, "hi"), 3))
    assert model.training
    model.eval()
    composed.train()
    list(iter_token_ids(composed, prompt_ids(composed, get_template("auto", composed.tokenizer),
                                             [{"role": "user", "content": "hi"}]), 3))
    assert composed.training
    composed.eval()
