"""ComposedModel: placeholder expansion to the exact feature count, features in place of the
placeholder embeddings, save/load round trip with equal outputs, cached generation equal to
uncached greedy decoding, trainer checkpoints, and merging an adapter."""

import pytest
import torch

from mmtune.data.templates import get_template
from mmtune.errors import MMTuneError
from mmtune.inference.generate import iter_token_ids
from mmtune.multimodal.data import LengthPolicy, collate_mm, encode_mm_sample
from mmtune.multimodal.model import load_composed, merge_composed, tiny_composed
from mmtune.multimodal.objective import model_batch
from mmtune.multimodal.synthetic_audio import procedural_speech
from mmtune.multimodal.synthetic_images import make_ocr_dataset, make_shapes_dataset


def _perturb(model, seed=0):
    """Random LoRA B (adapters start as the identity) and larger projector weights, so that every
    component visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n or "projector" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_composed(cache_root=tmp_path_factory.mktemp("cache")).eval()
    _perturb(model)
    template = get_template("auto", model.tokenizer)
    square = make_shapes_dataset(1, seed=3, size=64)[0]["image"]
    wide = make_ocr_dataset(1, seed=3, size=64, wide=True)[0]["image"]
    clip = procedural_speech("three one four", voice="tone-2")
    return model, template, {"square": square, "wide": wide, "clip": clip}


def _example(model, template, text, images=(), audios=()):
    tags = "<image>\n" * len(images) + "<audio>\n" * len(audios)
    sample = {"messages": [{"role": "user", "content": tags + text}, {"role": "assistant", "content": "red 3 left"}]}
    ims = [model.process_image(im) for im in images]
    aus = [model.process_audio(a) for a in audios]
    return encode_mm_sample(sample, ims, aus, model, template, LengthPolicy(1024, False))


def _batches(model, template, media):
    ex = {"text": _example(model, template, "What is 2 + 2?"),
          "image": _example(model, template, "What is it?", images=[media["square"], media["wide"]]),
          "audio": _example(model, template, "Transcribe.", audios=[media["clip"]]),
          "image+audio": _example(model, template, "Answer.", images=[media["square"]], audios=[media["clip"]])}
    pad = model.tokenizer.pad_token_id
    return {g: collate_mm([e], pad)["groups"][0] for g, e in ex.items()}


def test_placeholders_expand_to_exactly_the_feature_tokens(setup):
    model, template, media = setup
    ex = _example(model, template, "Read it.", images=[media["square"], media["wide"]], audios=[media["clip"]])
    square, wide = model.process_image(media["square"]), model.process_image(media["wide"])
    clip = model.process_audio(media["clip"])
    # tiny SigLIP 64 px / patch 8 -> 4x4 tokens per crop; phi4 layout (h*w + 1)*16 + 1 + (h+1)*4
    assert square.grid == (1, 1) and square.num_tokens == (1 + 1) * 16 + 1 + 2 * 4 == 41
    assert wide.grid == (1, 4) and wide.num_tokens == (4 + 1) * 16 + 1 + 2 * 4 == 89
    frames = (len(media["clip"]) - 400) // 160 + 1
    assert clip.num_tokens == -(-frames // 8)
    ids = ex["input_ids"]
    assert ids.count(model.image_token_id) == 41 + 89 and ids.count(model.audio_token_id) == clip.num_tokens
    assert all(lab == -100 for t, lab in zip(ids, ex["labels"]) if t in (model.image_token_id, model.audio_token_id))
    with torch.no_grad():
        assert model.encode_images([square, wide]).shape == (130, model.hidden_size)
        assert model.encode_audios([clip], "audio_projector").shape == (clip.num_tokens, model.hidden_size)


def test_features_replace_exactly_the_placeholder_embeddings(setup):
    model, template, media = setup
    b = _batches(model, template, media)["image+audio"]
    route = model.router.route("image+audio")
    with torch.no_grad():
        embeds = model.embed(b["input_ids"], b["images"], b["audios"], route)[0]  # (T, H)
        plain = model.language_model.get_input_embeddings()(b["input_ids"])[0]
        ids = b["input_ids"][0]
        img, aud = ids == model.image_token_id, ids == model.audio_token_id
        assert torch.equal(embeds[~(img | aud)], plain[~(img | aud)])
        assert torch.allclose(embeds[img], model.encode_images(b["images"]))
        assert torch.allclose(embeds[aud], model.encode_audios(b["audios"], "audio_projector_vs"))


def test_placeholder_count_mismatch_is_an_error(setup):
    model, template, media = setup
    b = _batches(model, template, media)["image"]
    with pytest.raises(MMTuneError, match="placeholder tokens"):
        model(b["input_ids"], images=b["images"][:1], group="image")


def test_save_load_round_trip_gives_equal_outputs(setup, tmp_path):
    model, template, media = setup
    batches = _batches(model, template, media)
    with torch.no_grad():
        before = {g: model(**model_batch(b)).logits for g, b in batches.items()}
    model.save(tmp_path / "composed")
    loaded = load_composed(tmp_path / "composed", device="cpu")
    assert sorted(n for n, _ in loaded.named_parameters()) == sorted(n for n, _ in model.named_parameters())
    assert loaded.router.table == model.router.table
    assert (loaded.image_token_id, loaded.audio_token_id) == (model.image_token_id, model.audio_token_id)
    with torch.no_grad():
        for g, b in batches.items():
            after = loaded(**model_batch(b)).logits
            assert torch.allclose(before[g], after, atol=1e-6, rtol=0), g
    # the processors survive too: the same image gives the same tiles and count
    a, b = model.process_image(media["wide"]), loaded.process_image(media["wide"])
    assert torch.equal(a.pixels, b.pixels) and a.num_tokens == b.num_tokens


def test_trainer_checkpoint_hook_round_trip(setup, tmp_path):
    from mmtune.train.checkpoint import load_model_weights

    model, _, _ = setup
    model.save_pretrained(tmp_path / "ckpt")
    other = tiny_composed(cache_root=tmp_path / "cache", seed=1)
    load_model_weights(other, tmp_path / "ckpt")
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), other.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_cached_generation_equals_uncached_greedy(setup):
    model, template, media = setup
    from mmtune.multimodal.data import prompt_ids

    images = [model.process_image(media["square"])]
    msgs = [{"role": "user", "content": "<image>\nWhat color is the circle?"}]
    ids = prompt_ids(model, template, msgs, images)
    got = list(iter_token_ids(model, ids, 6, images=images))
    seq = list(ids)
    with torch.no_grad():
        for _ in range(6):
            logits = model(torch.tensor([seq]), images=images).logits[0, -1]
            logits[[model.image_token_id, model.audio_token_id]] = float("-inf")
            seq.append(int(logits.argmax()))
    assert got == seq[len(ids):]


def test_merge_composed_folds_one_adapter(setup, tmp_path):
    model, template, media = setup
    batches = _batches(model, template, media)
    model.save(tmp_path / "src")
    merge_composed(tmp_path / "src", "vision", tmp_path / "merged")
    merged = load_composed(tmp_path / "merged", device="cpu")
    assert not hasattr(merged.language_model, "peft_config")
    assert set(merged.router.table.values()) == {None}
    with torch.no_grad():
        vision_route = model(**model_batch(batches["image"])).logits
        merged_image = merged(**model_batch(batches["image"])).logits
        assert torch.allclose(vision_route, merged_image, atol=1e-5)
        # the price of one set of weights: text now runs the vision-merged weights too
        text_base = model(**model_batch(batches["text"])).logits
        text_merged = merged(**model_batch(batches["text"])).logits
        assert (text_base - text_merged).abs().max() > 1e-3
    merge_composed(tmp_path / "src", None, tmp_path / "separate")
    separate = load_composed(tmp_path / "separate", device="cpu")
    assert sorted(separate.language_model.peft_config) == ["speech", "vision"]
    with pytest.raises(MMTuneError, match="no adapter 'sound'"):
        merge_composed(tmp_path / "src", "sound", tmp_path / "bad")


def test_chat_session_streams_and_reports_the_route(setup, tmp_path):
    from mmtune.inference.models import ComposedChatModel, load_composed_for_chat
    from mmtune.inference.session import ChatSession
    from mmtune.inference.turns import GenerationSettings, Turn
    from mmtune.multimodal.data import prompt_ids

    model, template, media = setup
    media["square"].save(tmp_path / "a.png")
    model.save(tmp_path / "run" / "final")
    loaded = load_composed_for_chat(tmp_path / "run")  # a run's output directory
    chat = ChatSession(ComposedChatModel(loaded, get_template("auto", loaded.tokenizer)),
                       settings=GenerationSettings(5, 0.0, 1.0))
    first = chat.send("What color is the circle?", images=[tmp_path / "a.png"])
    reply = "".join(first)
    assert first.route == "vision" and first.group == "image"
    # the reply is the greedy continuation of the same prompt
    ims = [loaded.process_image(media["square"])]
    ids = prompt_ids(loaded, template, [{"role": "user", "content": "<image>\nWhat color is the circle?"}], ims)
    expected = loaded.tokenizer.decode(list(iter_token_ids(loaded, ids, 5, stop_token_ids=template.stop_token_ids,
                                                           images=ims)), skip_special_tokens=True)
    assert reply == expected and chat.history[-1] == Turn("assistant", reply)
    follow = chat.send("And the square?")  # follow-up: the image stays in the prompt
    "".join(follow)
    assert follow.route == "vision" and follow.group == "image"
    assert sum(len(t.images) for t in chat.history) == 1
    chat.reset()
    text_only = chat.send("What is 2 + 2?")
    "".join(text_only)
    assert text_only.route == "base model" and text_only.group == "text"
    with pytest.raises(MMTuneError, match="holds no composed model"):
        load_composed_for_chat(tmp_path / "nothing")


def test_whisper_audio_tower_composes_and_round_trips(tmp_path):
    from transformers import WhisperConfig, WhisperModel

    cfg = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
                        max_source_positions=64, max_target_positions=16, vocab_size=64,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    WhisperModel(cfg).save_pretrained(tmp_path / "whisper")
    model = tiny_composed({"vision": None, "audio": {"encoder": "whisper", "path": str(tmp_path / "whisper")},
                           "adapters": [{"name": "speech", "r": 4}],
                           "stages": [{"name": "s", "sources": []}]}, cache_root=tmp_path / "cache").eval()
    template = get_template("auto", model.tokenizer)
    clip = procedural_speech("five", voice="tone-0")  # 0.32 s -> 32 Whisper frames -> 16 tokens (x2)
    ex = _example(model, template, "Transcribe.", audios=[clip])
    assert ex["audios"][0].num_tokens == -(-(len(clip) // 160) // 2) == ex["input_ids"].count(model.audio_token_id)
    b = collate_mm([ex], model.tokenizer.pad_token_id)["groups"][0]
    with torch.no_grad():
        before = model(**model_batch(b)).logits
        model.save(tmp_path / "m")
        loaded = load_composed(tmp_path / "m", device="cpu")
        assert torch.allclose(before, loaded(**model_batch(b)).logits, atol=1e-6)


def test_processed_image_keeps_phi4_float_global_view(setup):
    """process_image stores Phi-4's global view as float16 (not 8 bits): the pixels the tower sees
    equal the tiler's float ones within float16 rounding (8 bits would be off by up to 2/255)."""
    from mmtune.multimodal.tiling import phi4_crops

    model, _, media = setup
    proc = model.image_processor
    for im in (media["wide"], media["square"].resize((150, 97))):
        item = model.process_image(im)
        ref = phi4_crops(im, crop_size=proc.crop_size, max_crops=proc.max_crops, patch_size=proc.patch_size,
                         mean=proc.mean, std=proc.std).pixel_values()
        assert item.global_view.dtype == torch.float16
        assert (item.pixel_values()[-1] - ref[-1]).abs().max() <= 1e-3
        assert torch.equal(item.pixel_values()[:-1], ref[:-1])


def test_encode_images_masks_the_padding(setup):
    """Phi-4 tiles carry their patch mask to the tower: a padded image's features are those of the
    masked tower (not of the tower attending over the white padding)."""
    model, _, media = setup
    item = model.process_image(media["square"].resize((150, 97)))
    assert item.patch_mask is not None and not item.patch_mask.all()
    with torch.no_grad():
        got = model.encode_images([item])
        pixels = item.pixel_values()
        masked = model.vision_projector(model.vision_encoder(pixels, patch_mask=item.patch_mask), item.grid,
                                        item.sub_token_grid)
        unmasked = model.vision_projector(model.vision_encoder(pixels), item.grid, item.sub_token_grid)
    assert torch.equal(got, masked) and not torch.allclose(got, unmasked, atol=1e-4)
