"""The one generation loop: token by token with a KV cache, for plain transformers causal LMs
and for composed multimodal models, streamed as token ids or as decoded text.

Used by terminal chat, the web UI, the OpenAI-compatible server (through
:mod:`mmtune.inference.session`) and by task scoring during training. A small loop of our own
rather than ``model.generate`` + ``TextIteratorStreamer``: no thread, the caller stops early by
closing the iterator, sampling is seeded per call, and a composed model's first step runs on
input embeddings (image and audio features in place) with the router's adapter active.

- A *decoder* (:func:`decoder_for`) owns the model call: :meth:`CausalLMDecoder.prefill` runs
  the prompt and :meth:`CausalLMDecoder.step` one token, each returning the last position's
  logits (V,) and keeping the KV cache. Incremental logits equal a full forward's at every
  step (tested, fp32).
- :func:`iter_token_ids` is the loop: greedy when ``temperature == 0`` (exactly the tokens of
  ``model.generate(do_sample=False)``, tested), else a draw of :func:`~.sampling.sample_token`.
- :func:`stream_text` turns token ids into text pieces, with stop strings and token counts.

This module sits with the models (below training) in the import layers, so training-time
scoring uses the same loop.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence

import torch

from ..multimodal.groups import group_of
from ..multimodal.model import ComposedModel
from .sampling import sample_token


def _accepts_logits_to_keep(model) -> bool:
    """transformers causal LMs take ``logits_to_keep``: the prompt pass then computes only the
    last position's logits instead of (T, vocab)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


class CausalLMDecoder:
    """Incremental decoding of a transformers causal LM (a PEFT model too).

    Use as a context manager: the model is in eval mode inside and its training mode is
    restored on exit. ``banned`` token ids are never generated.
    """

    banned: tuple[int, ...] = ()

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        self.past = None
        self._extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
        self._was_training = False

    def __enter__(self) -> CausalLMDecoder:
        self._was_training = self.model.training
        self.model.eval()
        self.past = None
        return self

    def __exit__(self, *exc) -> None:
        self.past = None
        if self._was_training:
            self.model.train()

    def _run(self, **inputs) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(**inputs, past_key_values=self.past, use_cache=True, **self._extra)
        self.past = out.past_key_values
        return out.logits[0, -1].float().cpu().clone()  # (V,); a clone is a normal tensor (not inference-mode)

    def prefill(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Run the prompt; the next-token logits (V,)."""
        return self._run(input_ids=torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device))  # (1, T)

    def step(self, token: int) -> torch.Tensor:
        """Append one token; the next-token logits (V,)."""
        return self._run(input_ids=torch.tensor([[int(token)]], dtype=torch.long, device=self.device))  # (1, 1)


class ComposedDecoder(CausalLMDecoder):
    """Incremental decoding of a :class:`~mmtune.multimodal.model.ComposedModel`: the prompt
    enters as input embeddings with the features of ``images`` / ``audios`` at its placeholder
    tokens, the adapter the router picks for their modality group is active throughout, and
    placeholder tokens are never generated."""

    def __init__(self, composed: ComposedModel, images: Sequence = (), audios: Sequence = ()):
        super().__init__(composed.language_model)
        self.composed, self.images, self.audios = composed, list(images), list(audios)
        self.banned = tuple(t for t in (composed.image_token_id, composed.audio_token_id) if t is not None)
        self.route = composed.router.route(group_of(len(self.images), len(self.audios)))
        self._active = None

    def __enter__(self) -> ComposedDecoder:
        self._was_training = self.composed.training
        self.composed.eval()
        self.past = None
        self._active = self.composed.router.activate(self.model, self.route)
        self._active.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.past = None
        try:
            self._active.__exit__(*exc)
        finally:
            self._active = None
            if self._was_training:
                self.composed.train()

    def prefill(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)  # (1, T)
        with torch.inference_mode():
            embeds = self.composed.embed(ids, self.images, self.audios, self.route)  # (1, T, H)
        return self._run(inputs_embeds=embeds)


def decoder_for(model, images: Sequence = (), audios: Sequence = ()) -> CausalLMDecoder:
    """The decoder of ``model``: :class:`ComposedDecoder` for a composed model, else
    :class:`CausalLMDecoder` (images and audio need a composed model)."""
    if isinstance(model, ComposedModel):
        return ComposedDecoder(model, images, audios)
    if images or audios:
        raise ValueError("images and audio need a composed multimodal model")
    return CausalLMDecoder(model)


def iter_token_ids(model, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0,
                   top_p: float = 1.0, stop_token_ids: Iterable[int] = (), seed: int | None = None, *,
                   top_k: int = 0, images: Sequence = (), audios: Sequence = ()) -> Iterator[int]:
    """Yield generated token ids one at a time; a stop token ends generation and is not yielded.

    ``temperature == 0`` is greedy (argmax). Otherwise logits / temperature, top-k, nucleus
    filtering with ``top_p``, and a draw from a CPU generator seeded with ``seed`` (the global
    RNG when ``seed`` is None), so a seeded call is reproducible on any device. ``images`` /
    ``audios`` (processed, in prompt order) go with a composed model's placeholders.
    """
    if not prompt_ids:
        raise ValueError("generation needs at least one prompt token")
    stops = {int(t) for t in stop_token_ids}
    gen = torch.Generator().manual_seed(seed) if (seed is not None and temperature > 0) else None
    decoder = decoder_for(model, images, audios)
    with decoder:
        logits = decoder.prefill(prompt_ids)
        for i in range(max_new_tokens):
            if decoder.banned:
                logits[list(decoder.banned)] = float("-inf")
            tok = sample_token(logits, temperature, top_p, top_k, gen)
            if tok in stops:
                return
            yield tok
            if i + 1 < max_new_tokens:
                logits = decoder.step(tok)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string, and so
    must not be shown yet."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def stream_text(tokenizer, token_ids: Iterator[int], stops: Sequence[str] = (), max_new_tokens: int | None = None,
                state=None) -> Iterator[str]:
    """Decode generated token ids into text pieces as they come.

    The whole reply is re-decoded after each token and the new suffix yielded, so tokenizers
    whose pieces decode differently in context (SentencePiece leading spaces) stream
    correctly; a piece that ends inside a multi-byte character (U+FFFD) waits for the next
    token; special tokens are not shown. The reply ends before the first stop string (a piece
    that might be the start of one is held back until it is known not to be). Without stop
    strings the pieces join to ``tokenizer.decode(ids, skip_special_tokens=True)``.

    ``state``: an object with ``completion_tokens`` and ``finish_reason`` (a
    :class:`~mmtune.inference.session.Reply`), updated as tokens come: ``finish_reason`` is
    ``"stop"`` (stop token or string, or closed early) or ``"length"`` (``max_new_tokens``
    reached).
    """
    ids: list[int] = []
    text, shown = "", 0
    finish = None
    try:
        for tok in token_ids:
            ids.append(tok)
            if state is not None:
                state.completion_tokens = len(ids)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            cut = first_stop(text, stops)
            if cut is not None:
                finish = "stop"
                if cut > shown:
                    yield text[shown:cut]
                return
            if text.endswith("\ufffd"):
                continue
            end = len(text) - held_back(text, stops)
            if end > shown:
                yield text[shown:end]
                shown = end
        finish = "length" if max_new_tokens is not None and len(ids) >= max_new_tokens else "stop"
        if len(text) > shown:
            yield text[shown:]
    finally:
        if state is not None:
            state.finish_reason = finish or "stop"  # None: closed early by the caller
        close = getattr(token_ids, "close", None)
        if close is not None:
            close()


def generate_stream(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, stop_token_ids: Iterable[int] = (),
                    seed: int | None = None, *, top_k: int = 0, images: Sequence = (),
                    audios: Sequence = ()) -> Iterator[str]:
    """Yield decoded text pieces as tokens are generated (:func:`iter_token_ids` +
    :func:`stream_text`)."""
    tokens = iter_token_ids(model, prompt_ids, max_new_tokens, temperature, top_p, stop_token_ids, seed,
                            top_k=top_k, images=images, audios=audios)
    return stream_text(tokenizer, tokens)


def generate_text(model, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
                  top_p: float = 1.0, stop_token_ids: Iterable[int] = (), seed: int | None = None, *,
                  top_k: int = 0, images: Sequence = (), audios: Sequence = ()) -> str:
    """The whole reply of :func:`generate_stream` as one string."""
    return "".join(generate_stream(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p, stop_token_ids,
                                   seed, top_k=top_k, images=images, audios=audios))
