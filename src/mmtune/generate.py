"""Token-by-token generation with a KV cache, streamed as decoded text.

Used by the chat REPL, the web UI and the trainer's sample generations. A small loop of our
own rather than ``model.generate`` + ``TextIteratorStreamer``: no thread, the caller can stop
early by closing the iterator, and sampling is seeded per call. With ``temperature == 0`` it is
greedy and gives exactly the tokens of ``model.generate(do_sample=False)`` (tested).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator

import torch

from .models.sampling import top_p_filter  # noqa: F401 - kept importable from here


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _accepts_logits_to_keep(model) -> bool:
    """transformers causal LMs take ``logits_to_keep``: the prompt pass then computes only the
    last position's logits instead of (T, vocab)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def iter_token_ids(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, stop_token_ids: Iterable[int] = (),
                   seed: int | None = None) -> Iterator[int]:
    """Yield generated token ids one at a time; a stop token ends generation and is not yielded.

    ``temperature == 0`` is greedy (argmax). Otherwise logits / temperature, nucleus
    filtering with ``top_p``, and a multinomial draw from a CPU generator seeded with ``seed``
    (the global RNG when ``seed`` is None), so a seeded call is reproducible on any device.
    The model is put in eval mode while generating and restored afterwards.
    """
    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    stops = set(int(t) for t in stop_token_ids)
    device = _model_device(model)
    gen = None
    if seed is not None and temperature > 0:
        gen = torch.Generator().manual_seed(seed)
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)  # (1, T)
        past = None
        for _ in range(max_new_tokens):
            with torch.inference_mode():
                out = model(input_ids=ids, past_key_values=past, use_cache=True, **extra)
            past = out.past_key_values
            logits = out.logits[0, -1].float().cpu()  # (V,)
            if temperature <= 0:
                tok = int(torch.argmax(logits))
            else:
                probs = top_p_filter(torch.softmax(logits / temperature, dim=-1), top_p)
                tok = int(torch.multinomial(probs, 1, generator=gen))
            if tok in stops:
                return
            yield tok
            ids = torch.tensor([[tok]], dtype=torch.long, device=device)  # (1, 1)
    finally:
        if was_training:
            model.train()


def generate_stream(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, stop_token_ids: Iterable[int] = (),
                    seed: int | None = None) -> Iterator[str]:
    """Yield decoded text pieces as tokens are generated (see :func:`iter_token_ids`).

    The whole reply is re-decoded after each token and the new suffix yielded, so tokenizers
    whose pieces decode differently in context (SentencePiece leading spaces) stream
    correctly; a piece that ends inside a multi-byte character (U+FFFD) waits for the next
    token. Special tokens are not shown. The pieces join to ``tokenizer.decode(ids)``.
    """
    ids: list[int] = []
    shown = ""
    text = ""
    for tok in iter_token_ids(model, prompt_ids, max_new_tokens, temperature, top_p, stop_token_ids, seed):
        ids.append(tok)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(shown):
            continue
        yield text[len(shown):]
        shown = text
    if len(text) > len(shown):
        yield text[len(shown):]


def generate_text(model, tokenizer, prompt_ids: list[int], max_new_tokens: int = 256, temperature: float = 0.0,
                  top_p: float = 1.0, stop_token_ids: Iterable[int] = (), seed: int | None = None) -> str:
    """The whole reply of :func:`generate_stream` as one string."""
    return "".join(generate_stream(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p,
                                   stop_token_ids, seed))
