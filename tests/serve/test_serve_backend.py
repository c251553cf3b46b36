"""Chat models and sessions as the server and the UI use them: streamed decoding with token counts and stop strings, prompt limits,
attachments a model cannot take, and one generation at a time."""

from __future__ import annotations

import random
import threading
import time

import pytest

from mmtune.inference.generate import first_stop, generate_text, held_back, iter_token_ids, stream_text
from mmtune.inference.models import TextChatModel, default_model_name, load_chat_model
from mmtune.inference.session import Reply, respond
from mmtune.inference.turns import BASE_MODEL, GenerationSettings, InputError, Turn, split_attachments


def test_stream_text_with_counts_matches_generate_text(text_backend):
    b = text_backend
    ids = b.template.prompt_ids([{"role": "user", "content": "Reverse the words: sun moon star"}])
    for temperature, seed in ((0.0, None), (0.8, 3)):
        reply = Reply(len(ids), BASE_MODEL)
        tokens = iter_token_ids(b.model, ids, 30, temperature, 0.95, b.template.stop_token_ids, seed)
        text = "".join(stream_text(b.tokenizer, tokens, (), 30, reply))
        assert text == generate_text(b.model, b.tokenizer, ids, 30, temperature, 0.95, b.template.stop_token_ids, seed)
        n = len(list(iter_token_ids(b.model, ids, 30, temperature, 0.95, b.template.stop_token_ids, seed)))
        assert reply.completion_tokens == n
        assert reply.finish_reason == ("length" if n == 30 else "stop")


def test_stop_strings_on_random_token_streams(tiny_dir):
    """Whatever the token boundaries, the pieces join to the decoded text cut before the first
    stop string, and no piece ever shows part of a stop string that then completes."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    rng = random.Random(0)
    vocab = [i for i in range(len(tok)) if i >= 3]
    for _ in range(200):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 25))]
        full = tok.decode(ids, skip_special_tokens=True)
        if len(full) < 4:
            continue
        a = rng.randrange(len(full) - 2)
        stops = [full[a:a + rng.randint(1, 3)], "\x00never"]
        reply = Reply(0, BASE_MODEL)
        pieces = list(stream_text(tok, iter(ids), stops, 1000, reply))
        expected = full[: first_stop(full, stops)]
        assert "".join(pieces) == expected
        assert reply.finish_reason == "stop"
        assert reply.completion_tokens <= len(ids)


def test_held_back_and_first_stop():
    assert held_back("hello <|e", ["<|end|>"]) == 3
    assert held_back("hello", ["<|end|>"]) == 0
    assert held_back("ab", ["abc", "bx"]) == 2
    assert first_stop("one STOP two END", ["END", "STOP"]) == 4
    assert first_stop("nothing", ["x"]) is None


def test_attachments_a_text_model_cannot_take(text_backend, tmp_path):
    img = tmp_path / "cat.png"
    img.write_bytes(b"\x89PNG")
    turns = [Turn("user", "What is in the picture?", images=[str(img)])]
    with pytest.raises(InputError) as e:
        respond(text_backend, turns, GenerationSettings(4, 0.0))
    assert e.value.code == "unsupported_image" and "no vision encoder" in str(e.value)
    reply = respond(text_backend, turns, GenerationSettings(4, 0.0), strict=False)
    assert len(reply.notes) == 1 and "no vision encoder" in reply.notes[0] and "cat.png" in reply.notes[0]
    text = reply.text()
    plain = respond(text_backend, [Turn("user", "What is in the picture?")], GenerationSettings(4, 0.0)).text()
    assert text == plain and reply.prompt_tokens == text_backend.count_prompt_tokens(turns)
    with pytest.raises(InputError) as e:
        respond(text_backend, [Turn("user", "hi", audios=["a.wav"])], GenerationSettings(4, 0.0))
    assert e.value.code == "unsupported_audio" and "no audio encoder" in str(e.value)


def test_prompt_limit_and_reply_cut_to_the_context(text_backend):
    b = text_backend
    small = TextChatModel(b.model, b.tokenizer, b.template, "tiny", max_prompt_tokens=12)
    with pytest.raises(InputError) as e:
        respond(small, [Turn("user", "one two three four five six seven eight nine")], GenerationSettings(4))
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"
    with pytest.raises(InputError):
        respond(b, [], GenerationSettings(4))
    # a prompt 8 tokens short of the context: the reply stops there with finish_reason "length"
    text = "a b " * 2000
    ids = b.tokenizer(text, add_special_tokens=False)["input_ids"]
    overhead = b.count_prompt_tokens([Turn("user", "")])
    content = b.tokenizer.decode(ids[: b.context_length - 8 - overhead])
    turns = [Turn("user", content)]
    n = b.count_prompt_tokens(turns)
    assert b.context_length - 12 <= n <= b.context_length - 4
    reply = respond(b, turns, GenerationSettings(max_new_tokens=256, temperature=0.0))
    reply.text()
    assert reply.completion_tokens <= b.context_length - n
    if reply.completion_tokens == b.context_length - n:
        assert reply.finish_reason == "length"


def test_one_generation_at_a_time(text_backend):
    first = iter(respond(text_backend, [Turn("user", "What is 3 + 4?")], GenerationSettings(64, 0.8, seed=1)))
    second = iter(respond(text_backend, [Turn("user", "What is 5 + 4?")], GenerationSettings(8, 0.0)))
    next(first)  # the first reply now holds the backend
    got = []
    worker = threading.Thread(target=lambda: got.append(next(second, None)), daemon=True)
    worker.start()
    time.sleep(0.5)
    assert got == [] and worker.is_alive()  # waits while the first reply is open
    first.close()
    worker.join(30)
    assert len(got) == 1
    second.close()


def test_load_chat_model_and_names(tiny_dir, tmp_path):
    b = load_chat_model(str(tiny_dir))
    assert isinstance(b, TextChatModel) and b.modalities == {"text"} and b.default_route() == BASE_MODEL
    assert b.describe()["context_length"] == 1024
    assert default_model_name("builtin:tiny") == "builtin:tiny"
    assert default_model_name("runs/quickstart/final") == "quickstart/final"
    assert default_model_name("runs/x/checkpoints/step-00000030") == "x/step-00000030"
    assert default_model_name("/models/Qwen2.5-0.5B-Instruct/") == "Qwen2.5-0.5B-Instruct"
    assert default_model_name("base", "out/adapter") == "adapter"
    assert split_attachments(["a.PNG", "b.wav", "c.pdf", "d.jpeg", "e.webm"]) == (
        ["a.PNG", "d.jpeg"], ["b.wav", "e.webm"], ["c.pdf"])


def test_lora_adapter_is_the_route(tiny_dir, tmp_path):
    """A model loaded with a LoRA adapter answers through it, and says so."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "my-adapter"
    model.save_pretrained(adapter)
    b = TextChatModel.from_dir(str(tiny_dir), str(adapter))
    assert b.name == "my-adapter" and b.default_route() == "LoRA adapter my-adapter"
    reply = respond(b, [Turn("user", "Hi")], GenerationSettings(2, 0.0))
    reply.text()
    assert reply.route == "LoRA adapter my-adapter"


@pytest.mark.slow
def test_composed_model_backend_routes_by_modality(composed_dir, tmp_path):
    import numpy as np
    import soundfile as sf
    from PIL import Image

    from mmtune.inference.models import ComposedChatModel, is_composed_model

    assert is_composed_model(composed_dir) and not is_composed_model("builtin:tiny")
    b = load_chat_model(str(composed_dir))
    assert isinstance(b, ComposedChatModel) and b.modalities == {"text", "image", "audio"}
    img, wav = tmp_path / "red.png", tmp_path / "tone.wav"
    Image.new("RGB", (64, 64), (220, 20, 20)).save(img)
    sf.write(wav, (0.2 * np.sin(np.linspace(0, 2 * np.pi * 300, 8000))).astype("float32"), 16000)
    routes, lengths = {}, {}
    for name, turn in (("text", Turn("user", "Hi")), ("image", Turn("user", "Hi", images=[str(img)])),
                       ("audio", Turn("user", "Hi", audios=[str(wav)])),
                       ("both", Turn("user", "Hi", images=[str(img)], audios=[str(wav)]))):
        reply = respond(b, [turn], GenerationSettings(3, 0.0))
        reply.text()
        routes[name], lengths[name] = reply.route, reply.prompt_tokens
    assert routes == {"text": "base model", "image": "vision", "audio": "speech", "both": "vision"}
    assert lengths["both"] == lengths["image"] + lengths["audio"] - lengths["text"]
    # media of earlier turns stay in the prompt: a follow-up is still routed to vision
    follow = respond(b, [Turn("user", "Hi", images=[str(img)]), Turn("assistant", "A square."),
                      Turn("user", "What colour?")], GenerationSettings(2, 0.0))
    follow.text()
    assert follow.route == "vision"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError) as e:
        respond(b, [Turn("user", "Hi", images=[str(bad)])], GenerationSettings(2, 0.0))
    assert e.value.code == "invalid_image" and "broken.png" in str(e.value)
