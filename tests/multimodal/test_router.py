"""The modality router: the route of each modality combination (text, image, audio,
image+audio), that a route really runs its adapter / projector (parity with calling PEFT by
hand), mixed micro-batches, and that routing never changes what trains."""

import pytest
import torch

from mmtune.data.templates import get_template
from mmtune.multimodal.config import MultimodalConfig
from mmtune.multimodal.data import LengthPolicy, collate_mm, encode_mm_sample
from mmtune.multimodal.model import tiny_composed
from mmtune.multimodal.objective import MultimodalObjective, model_batch
from mmtune.multimodal.router import ModalityRouter, Route, group_of, split_by_group
from mmtune.multimodal.stages import apply_stage, trainable_names
from mmtune.multimodal.synthetic_audio import procedural_speech
from mmtune.multimodal.synthetic_images import make_shapes_dataset
from mmtune.train.objectives import shifted_token_loss


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_composed(cache_root=tmp_path_factory.mktemp("cache")).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # adapters start as the identity: make each one change the output
        for n, p in model.named_parameters():
            if ".lora_B." in n or "projector" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    template = get_template("auto", model.tokenizer)
    images = [model.process_image(r["image"]) for r in make_shapes_dataset(3, seed=5, size=64)]
    clips = [model.process_audio(procedural_speech(t, voice="tone-1")) for t in ("one two", "nine", "four four")]
    return model, template, images, clips


def _ex(model, template, images=(), audios=(), answer="blue"):
    tags = "<image>\n" * len(images) + "<audio>\n" * len(audios)
    sample = {"messages": [{"role": "user", "content": tags + "Answer."}, {"role": "assistant", "content": answer}]}
    return encode_mm_sample(sample, list(images), list(audios), model, template, LengthPolicy(1024, False))


EXPECTED = {  # Phi-4-multimodal's table (docs/reference/multimodal.md#modality-router)
    "text": Route("text", None, None),
    "image": Route("image", "vision", None),
    "audio": Route("audio", "speech", "audio_projector"),
    "image+audio": Route("image+audio", "vision", "audio_projector_vs"),
}


def test_groups_and_default_routes():
    assert [group_of(0, 0), group_of(2, 0), group_of(0, 1), group_of(1, 3)] == ["text", "image", "audio",
                                                                                "image+audio"]
    cfg = MultimodalConfig.model_validate({"vision": {}, "audio": {}, "adapters": [{"name": "vision"},
                                                                                   {"name": "speech"}],
                                           "stages": [{"name": "s", "sources": []}]})
    router = ModalityRouter(cfg.resolved_router(), vision_speech=cfg.builds_vision_speech)
    assert {g: router.route(g) for g in EXPECTED} == EXPECTED
    # a text adapter and no vision-speech projector
    cfg2 = cfg.model_copy(update={"router": cfg.router.model_copy(update={"text": "speech"}), "vision_speech": False})
    r2 = ModalityRouter(cfg2.resolved_router(), vision_speech=False)
    assert r2.route("text") == Route("text", "speech", None)
    assert r2.route("image+audio") == Route("image+audio", "vision", "audio_projector")


def test_router_names_must_exist():
    from mmtune.config import validate_recipe
    from mmtune.errors import ConfigError

    with pytest.raises(ConfigError, match="router.image = 'visoin' is not an adapter. Did you mean 'vision'"):
        validate_recipe({"multimodal": {"vision": {}, "adapters": [{"name": "vision"}], "router": {"image": "visoin"},
                                        "stages": [{"name": "s", "sources": []}]}})


def test_forward_reports_the_route_of_each_combination(setup):
    model, template, images, clips = setup
    cases = {"text": _ex(model, template), "image": _ex(model, template, images[:1]),
             "audio": _ex(model, template, audios=clips[:1]),
             "image+audio": _ex(model, template, images[:1], clips[:1])}
    pad = model.tokenizer.pad_token_id
    with torch.no_grad():
        for group, ex in cases.items():
            b = collate_mm([ex], pad)["groups"][0]
            assert b["group"] == group
            out = model(b["input_ids"], images=b["images"], audios=b["audios"])  # group inferred from the media
            assert out.route == EXPECTED[group]


def _manual_logits(model, batch, adapter, audio_projector=None):
    """What the route must compute, with PEFT driven by hand."""
    lm = model.language_model
    route = Route(batch["group"], adapter, audio_projector)
    embeds = model.embed(batch["input_ids"], batch["images"], batch["audios"], route)
    if adapter is None:
        with lm.disable_adapter():
            return lm(inputs_embeds=embeds).logits
    lm.set_adapter(adapter)
    return lm(inputs_embeds=embeds).logits


def test_each_route_runs_its_adapter_and_projector(setup):
    model, template, images, clips = setup
    pad = model.tokenizer.pad_token_id
    b = {g: collate_mm([e], pad)["groups"][0] for g, e in
         {"text": _ex(model, template), "image": _ex(model, template, images[:1]),
          "audio": _ex(model, template, audios=clips[:1]),
          "image+audio": _ex(model, template, images[:1], clips[:1])}.items()}
    with torch.no_grad():
        got = {g: model(**model_batch(x)).logits for g, x in b.items()}
        assert torch.equal(got["text"], _manual_logits(model, b["text"], None))
        base_lm = model.language_model.get_base_model()
        with model.language_model.disable_adapter():  # text = the plain base LM on token ids
            assert torch.allclose(got["text"], base_lm(input_ids=b["text"]["input_ids"]).logits, atol=1e-6)
        assert torch.equal(got["image"], _manual_logits(model, b["image"], "vision"))
        assert torch.equal(got["audio"], _manual_logits(model, b["audio"], "speech", "audio_projector"))
        assert torch.equal(got["image+audio"], _manual_logits(model, b["image+audio"], "vision", "audio_projector_vs"))
        # the choice matters: the other adapter / projector gives other logits
        assert not torch.allclose(got["image"], _manual_logits(model, b["image"], "speech"), atol=1e-4)
        assert not torch.allclose(got["image+audio"], _manual_logits(model, b["image+audio"], "vision",
                                                                     "audio_projector"), atol=1e-4)
    model.language_model.set_adapter("vision")


def test_mixed_batch_is_split_by_group_and_each_sample_gets_its_route(setup):
    model, template, images, clips = setup
    rows = [_ex(model, template, images[:1]), _ex(model, template), _ex(model, template, audios=clips[:1]),
            _ex(model, template, images[1:2], clips[1:2]), _ex(model, template, images[2:3], answer="three"),
            _ex(model, template, audios=clips[2:3], answer="4 4")]
    pad = model.tokenizer.pad_token_id
    batch = collate_mm(rows, pad)
    assert [g["group"] for g in batch["groups"]] == ["image", "text", "audio", "image+audio"]
    assert [len(g["images"]) for g in batch["groups"]] == [2, 0, 0, 1]
    assert split_by_group([r["group"] for r in rows]) == {"image": [0, 4], "text": [1], "audio": [2, 5],
                                                          "image+audio": [3]}
    model.router.reset_counts()
    with torch.no_grad():
        out = MultimodalObjective()(model, batch)
        # reference: every sample alone through the route of its own modalities
        ref_sum, ref_n = 0.0, 0
        for r in rows:
            b = collate_mm([r], pad)["groups"][0]
            logits = model(b["input_ids"], images=b["images"], audios=b["audios"]).logits
            s, n = shifted_token_loss(logits, b["labels"])
            ref_sum, ref_n = ref_sum + float(s), ref_n + int(n)
    assert abs(float(out.loss_sum) - ref_sum) < 1e-4 and out.count == ref_n
    assert out.metrics == {"samples/image->vision": 2.0, "samples/text->base": 1.0, "samples/audio->speech": 2.0,
                           "samples/image+audio->vision": 1.0}
    assert model.router.counts == {("image", "vision"): 4, ("text", None): 2, ("audio", "speech"): 4,
                                   ("image+audio", "vision"): 2}


def test_routing_never_changes_what_trains(setup):
    model, template, images, clips = setup
    stage = MultimodalConfig.model_validate({
        "vision": {}, "audio": {}, "adapters": [{"name": "vision"}, {"name": "speech"}],
        "stages": [{"name": "v", "sources": [], "trainable": {"llm": "lora", "vision_projector": "full"},
                    "adapter": "vision"}]}).stages[0]
    plan = apply_stage(model, stage, 1e-3, log_fn=lambda *_: None)
    before = trainable_names(model)
    assert before == plan.trainable
    pad = model.tokenizer.pad_token_id
    batch = collate_mm([_ex(model, template), _ex(model, template, audios=clips[:1]),
                        _ex(model, template, images[:1])], pad)
    model.zero_grad(set_to_none=True)
    out = MultimodalObjective()(model, batch)
    out.loss_sum.backward()
    assert trainable_names(model) == before  # PEFT's set_adapter/disable_adapter flips were undone
    with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    assert with_grad == before  # gradients reach exactly the stage's set (via the image sample)
    assert all(".speech." not in n for n in with_grad)
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
