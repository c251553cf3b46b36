"""ELECTRA: replaced-token labels, tied embeddings, generator size, the combined loss."""

import torch
import torch.nn.functional as F
from transformers import ElectraConfig, ElectraForMaskedLM, ElectraForPreTraining

from mmtune.encoders.electra import ElectraPretrainer, generator_config, replace_masked, rtd_labels
from mmtune.encoders.masking import IGNORE
from mmtune.encoders.models import EncoderModule, load_encoder_module
from mmtune.encoders.objectives import ElectraObjective

SPECIAL = [0, 1, 2, 3, 4]


def tiny_pretrainer(size=0.25, seed=0):
    torch.manual_seed(seed)
    disc_cfg = ElectraConfig(vocab_size=60, embedding_size=16, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=32)
    gen = ElectraForMaskedLM(generator_config(disc_cfg, size))
    disc = ElectraForPreTraining(disc_cfg)
    return ElectraPretrainer(gen, disc, SPECIAL)


def test_labels_for_replaced_kept_and_same_token():
    original = torch.tensor([[2, 10, 11, 12, 13, 3]])
    masked = torch.tensor([[2, 4, 11, 4, 4, 3]])  # positions 1, 3, 4 selected
    labels = torch.tensor([[IGNORE, 10, IGNORE, 12, 13, IGNORE]])
    sampled = torch.tensor([20, 12, 13])  # 1: replaced; 3: sampled the original; 4: ... also the original
    disc_ids = replace_masked(masked, labels, sampled)
    assert disc_ids.tolist() == [[2, 20, 11, 12, 13, 3]]
    assert rtd_labels(disc_ids, original).tolist() == [[0, 1, 0, 0, 0, 0]]
    sampled = torch.tensor([10, 40, 13])
    assert rtd_labels(replace_masked(masked, labels, sampled), original).tolist() == [[0, 0, 0, 1, 0, 0]]


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    original = torch.randint(5, 60, (8, 20), generator=g)
    original[:, 0], original[:, -1] = 2, 3
    selected = (torch.rand(original.shape, generator=g) < 0.3)
    selected[:, 0] = selected[:, -1] = False
    masked = torch.where(selected, torch.full_like(original, 4), original)
    labels = torch.where(selected, original, torch.full_like(original, IGNORE))
    attention = torch.ones_like(original)
    attention[:2, 15:] = 0  # padding
    return {"input_ids": masked, "labels": labels, "original_ids": original, "attention_mask": attention}


def test_forward_labels_match_what_the_discriminator_sees():
    model = tiny_pretrainer()
    b = _batch()
    torch.manual_seed(0)
    out = model(b["input_ids"], b["attention_mask"], b["labels"], b["original_ids"])
    selected = b["labels"] != IGNORE
    assert out.gen_logits.shape == (int(selected.sum()), 60)
    # unselected positions are the original text, labelled original
    assert torch.equal(out.disc_ids[~selected], b["original_ids"][~selected])
    assert (out.disc_labels[~selected] == 0).all()
    # selected positions hold samples (never special tokens); label 1 iff the sample differs
    assert not torch.isin(out.disc_ids[selected], torch.tensor(SPECIAL)).any()
    assert torch.equal(out.disc_labels[selected], (out.disc_ids[selected] != b["original_ids"][selected]).long())


def test_embeddings_are_one_tensor_and_stay_tied():
    model = tiny_pretrainer()
    gen, disc = model.generator, model.discriminator
    w = disc.electra.embeddings.word_embeddings.weight
    assert gen.electra.embeddings.word_embeddings.weight is w
    assert gen.generator_lm_head.weight is w
    assert gen.electra.embeddings.position_embeddings.weight is disc.electra.embeddings.position_embeddings.weight
    assert gen.electra.embeddings.word_embeddings.weight.data_ptr() == w.data_ptr()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    b = _batch()
    ElectraObjective()(model, b).loss_sum.backward()
    opt.step()
    assert torch.equal(gen.electra.embeddings.word_embeddings.weight, disc.electra.embeddings.word_embeddings.weight)
    assert gen.generator_lm_head.weight is disc.electra.embeddings.word_embeddings.weight


def test_generator_is_a_quarter_wide_and_shares_embedding_width():
    model = tiny_pretrainer(0.25)
    g, d = model.generator.config, model.discriminator.config
    assert (g.hidden_size, g.num_attention_heads, g.intermediate_size) == (8, 1, 16)
    assert g.embedding_size == d.embedding_size and g.num_hidden_layers == d.num_hidden_layers


def test_loss_is_mlm_mean_plus_lambda_times_rtd_mean():
    model = tiny_pretrainer()
    b = _batch(1)
    torch.manual_seed(3)
    res = ElectraObjective(rtd_weight=50.0)(model, b)
    torch.manual_seed(3)
    out = model(b["input_ids"], b["attention_mask"], b["labels"], b["original_ids"])
    real = b["attention_mask"].bool()
    mlm = F.cross_entropy(out.gen_logits, out.gen_labels)
    rtd = F.binary_cross_entropy_with_logits(out.disc_logits[real], out.disc_labels[real].float())
    assert res.count == int((b["labels"] != IGNORE).sum())
    assert torch.allclose(res.loss_sum / res.count, mlm + 50.0 * rtd, rtol=1e-5)


def test_save_and_reload_keeps_weights_and_tie(tmp_path):
    model = tiny_pretrainer()
    spec = {"kind": "electra", "special_ids": SPECIAL, "adapter": {"type": "none"},
            "configs": {"generator": model.generator.config.to_dict(),
                        "discriminator": model.discriminator.config.to_dict()}}
    EncoderModule(model, spec).save_pretrained(tmp_path)
    back = load_encoder_module(tmp_path).net
    assert back.generator.generator_lm_head.weight is back.discriminator.electra.embeddings.word_embeddings.weight
    for (n, p), (_, q) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), n
