"""`mmtune eval` on a continued-pretraining recipe: the held-out loss (mmtune.evaluation.text_loss)."""

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmtune.evaluation import text_loss
from mmtune.models.tiny import ensure_tiny


def test_text_loss_is_the_token_weighted_next_token_cross_entropy():
    path = ensure_tiny()
    model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    records = [{"text": "the cat sat on the mat"}, {"text": "a much longer record about dogs and cats and mats"}]
    got = text_loss(model, tok, records, max_length=64)
    nll, n = 0.0, 0
    for r in records:
        ids = tok(r["text"], return_tensors="pt").input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
        n += ids.shape[1] - 1
    assert got["tokens"] == n
    assert math.isclose(got["eval_loss"], nll / n, rel_tol=1e-5)
    assert math.isclose(got["perplexity"], math.exp(nll / n), rel_tol=1e-5)
