"""Chat templates: a conversation -> the exact text and tokens the model sees, and which tokens learn.

A template renders a conversation to one string, tokenizes that string in one call (so token
boundaries are those of the model's own tokenizer, identical to ``tokenizer.apply_chat_template``)
and marks as supervised the tokens of each assistant turn's content plus the turn terminator
(``<|im_end|>``, ``<|eot_id|>``, ``<|end|>``): the model must learn to stop. The role headers,
the user and system turns and the whitespace after a terminator are not supervised.

``get_template(name, tokenizer)``:

- ``auto``: the tokenizer's own Jinja ``chat_template`` when it has one (rendered with
  ``tokenizer.apply_chat_template``; assistant spans are found by rendering prefixes of the
  conversation, so no template-specific knowledge is needed), else ``chatml``.
- ``chatml``, ``llama3``, ``internlm2``, ``phi3``: the published formats, written out below with
  the source of each.

Labels follow the Hugging Face convention (aligned with ``input_ids``; -100 = no loss) and the
first label is always -100, so a sample's loss is the same alone and inside a packed row.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..errors import ConfigError, DataError
from ..registry import Registry

IGNORE = -100
LossOn = Literal["assistant", "all", "last_turn"]
Span = tuple[int, int]  # [start, end) character offsets in the rendered text


class ChatTemplate(abc.ABC):
    """Renders and encodes conversations for one tokenizer.

    Subclasses implement :meth:`render_spans`; everything else (tokenization, labels, prompts for
    inference) is shared, so training and inference cannot disagree.
    """

    name = "base"

    def __init__(self, tokenizer, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    # -- what subclasses provide ---------------------------------------------------------------
    @abc.abstractmethod
    def render_spans(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[Span]]:
        """The rendered text and, per assistant turn in order, the character span of its content
        plus turn terminator (the supervised part)."""

    @abc.abstractmethod
    def stop_strings(self) -> list[str]:
        """Token strings that end an assistant turn (generation stops at any of them)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Everything that determines the rendering; hashed into the tokenization cache key."""

    # -- shared ----------------------------------------------------------------------------------
    def with_system(self, messages: list[dict]) -> list[dict]:
        """``messages`` with the default system prompt prepended when they have none."""
        if self.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return list(messages)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.render_spans(self.with_system(messages), add_generation_prompt)[0]

    def encode(self, messages: list[dict], loss_on: LossOn = "assistant",
               answer_marker: str | None = None) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a whole conversation for training.

        ``loss_on``: ``assistant`` supervises every assistant turn, ``last_turn`` only the last
        one, ``all`` every token. The first label is always -100. With ``answer_marker`` (e.g.
        "Answer:"), a supervised assistant turn containing it is supervised only from its last
        occurrence on: the rationale before it stays in the context without loss.
        """
        text, spans = self.render_spans(self.with_system(messages), False)
        if answer_marker:
            spans = [(max(a, text.rfind(answer_marker, a, b)), b) for a, b in spans]
        if loss_on == "last_turn":
            spans = spans[-1:]
        elif loss_on == "all":
            spans = [(0, len(text))]
        elif loss_on != "assistant":
            raise ConfigError(f"loss_on must be one of assistant, all, last_turn; got {loss_on!r}")
        ids, mask = tokenize_spans(self.tokenizer, text, spans)
        labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        if labels:
            labels[0] = IGNORE
        return ids, labels

    def prompt_text(self, messages: list[dict]) -> str:
        """The inference prompt: the conversation so far plus the assistant header, rendered exactly
        as the same turns are rendered in training."""
        return self.render(messages, add_generation_prompt=True)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return list(self.tokenizer(self.prompt_text(messages), add_special_tokens=False)["input_ids"])

    def render_prompt(self, messages: list[dict]) -> list[int]:
        """Same as :meth:`prompt_ids`."""
        return self.prompt_ids(messages)

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end generation: the turn terminator(s) and the tokenizer's EOS."""
        ids: list[int] = []
        for s in self.stop_strings():
            tid = single_token_id(self.tokenizer, s)
            if tid is not None and tid not in ids:
                ids.append(tid)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.name}\x00{self.describe()}\x00{self.system_prompt}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenization with supervision spans


def single_token_id(tokenizer, text: str) -> int | None:
    """The id of ``text`` if the tokenizer encodes it as exactly one token, else None."""
    if not text:
        return None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def tokenize_spans(tokenizer, text: str, spans: list[Span]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and, per token, whether it overlaps one of ``spans``.

    Fast tokenizers tokenize the whole text once and use character offsets, which gives exactly
    the ids of ``tokenizer(text)``. Other tokenizers are fed the text piece by piece, cut at the
    span boundaries.
    """
    if getattr(tokenizer, "is_fast", False):
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is not None and hasattr(backend, "encode"):
            # The Rust tokenizer directly (what ``tokenizer(text)`` calls, without its per-call overhead).
            enc = backend.encode(text, add_special_tokens=False)
            ids, offsets = list(enc.ids), enc.offsets
        else:
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        if not spans or not ids:
            return ids, [False] * len(ids)
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (T, 2) character offsets
        starts = np.asarray([a for a, _ in spans], dtype=np.int64)
        ends = np.asarray([b for _, b in spans], dtype=np.int64)
        tok_end = np.maximum(off[:, 1], off[:, 0] + 1)  # zero-width tokens count at their position
        k = np.searchsorted(starts, tok_end - 1, side="right") - 1  # last span starting before the token ends
        mask = (k >= 0) & (ends[np.maximum(k, 0)] > off[:, 0])
        return ids, mask.tolist()
    ids, mask, pos = [], [], 0
    for a, b in [*spans, (len(text), len(text))]:
        for piece, sup in ((text[pos:a], False), (text[a:b], True)):
            if piece:
                part = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids += part
                mask += [sup] * len(part)
        pos = max(pos, b)
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Built-in templates


@dataclass(frozen=True)
class TemplateSpec:
    """A turn-based chat format. ``{role}`` in ``header`` is the message role; ``{bos}``/``{eos}``
    are the tokenizer's BOS/EOS strings (empty when it has none), as in the published Jinja."""

    name: str
    source: str
    begin: str  # once, before the first turn
    header: str  # before each turn's content
    terminator: str  # after each turn's content; supervised on assistant turns
    separator: str  # after the terminator; never supervised
    generation_prompt: str  # appended for inference
    end: str  # appended when there is no generation prompt
    stop: tuple[str, ...]
    required_tokens: tuple[str, ...]
    trim: bool = False  # strip whitespace around content (Jinja `| trim`)


BUILTIN_SPECS: dict[str, TemplateSpec] = {}


def _spec(spec: TemplateSpec) -> TemplateSpec:
    BUILTIN_SPECS[spec.name] = spec
    return spec


_spec(TemplateSpec(
    name="chatml",
    source="ChatML (OpenAI), as shipped by Qwen2/Qwen2.5 and LLaMA-Factory `chatml`: "
           "<|im_start|>{role}\\n{content}<|im_end|>\\n",
    begin="", header="<|im_start|>{role}\n", terminator="<|im_end|>", separator="\n",
    generation_prompt="<|im_start|>assistant\n", end="", stop=("<|im_end|>",),
    required_tokens=("<|im_start|>", "<|im_end|>")))

_spec(TemplateSpec(
    name="llama3",
    source="Meta-Llama-3-8B-Instruct tokenizer_config.json chat_template: bos_token, then per message "
           "<|start_header_id|>{role}<|end_header_id|>\\n\\n{content | trim}<|eot_id|>; stop on <|eot_id|> "
           "and <|end_of_text|> (generation_config eos_token_id [128001, 128009])",
    begin="{bos}", header="<|start_header_id|>{role}<|end_header_id|>\n\n", terminator="<|eot_id|>",
    separator="", generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n", end="",
    stop=("<|eot_id|>", "<|end_of_text|>"),
    required_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), trim=True))

_spec(TemplateSpec(
    name="internlm2",
    source="internlm2-chat-7b tokenizer_config.json chat_template: bos_token + ChatML turns; "
           "generation stops on <|im_end|> (id 92542) or </s> (generation_config eos_token_id [2, 92542])",
    begin="{bos}", header="<|im_start|>{role}\n", terminator="<|im_end|>", separator="\n",
    generation_prompt="<|im_start|>assistant\n", end="", stop=("<|im_end|>",),
    required_tokens=("<|im_start|>", "<|im_end|>")))

_spec(TemplateSpec(
    name="phi3",
    source="Phi-3-mini-4k-instruct tokenizer_config.json chat_template: <|{role}|>\\n{content}<|end|>\\n "
           "per message, '<|assistant|>\\n' as generation prompt, else eos_token at the end; stop on <|end|> "
           "(id 32007) or <|endoftext|>",
    begin="", header="<|{role}|>\n", terminator="<|end|>", separator="\n",
    generation_prompt="<|assistant|>\n", end="{eos}", stop=("<|end|>", "<|endoftext|>"),
    required_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")))


class BuiltinTemplate(ChatTemplate):
    """A template from :data:`BUILTIN_SPECS`."""

    def __init__(self, spec: TemplateSpec, tokenizer, system_prompt: str | None = None):
        super().__init__(tokenizer, system_prompt)
        self.spec = spec
        self.name = spec.name

    def _fill(self, s: str) -> str:
        tok = self.tokenizer
        return s.replace("{bos}", getattr(tok, "bos_token", None) or "").replace(
            "{eos}", getattr(tok, "eos_token", None) or "")

    def render_spans(self, messages, add_generation_prompt=False):
        sp = self.spec
        parts, spans, pos = [], [], 0

        def put(s: str) -> None:
            nonlocal pos
            parts.append(s)
            pos += len(s)

        put(self._fill(sp.begin))
        for msg in messages:
            content = msg["content"].strip() if sp.trim else msg["content"]
            put(sp.header.format(role=msg["role"]))
            start = pos
            put(content + sp.terminator)
            if msg["role"] == "assistant":
                spans.append((start, pos))
            put(sp.separator)
        put(sp.generation_prompt if add_generation_prompt else self._fill(sp.end))
        return "".join(parts), spans

    def stop_strings(self):
        return list(self.spec.stop)

    def describe(self):
        return f"{self.spec!r}|{self._fill('{bos}|{eos}')}"


# ---------------------------------------------------------------------------------------------
# The tokenizer's own Jinja template


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of ``a`` and ``b`` (slice comparisons run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class TokenizerTemplate(ChatTemplate):
    """The tokenizer's ``chat_template``, rendered with ``tokenizer.apply_chat_template``.

    Assistant spans are found without knowing the template: the content of assistant turn i
    starts where ``render(messages[:i], add_generation_prompt=True)`` ends, and the turn ends where
    ``render(messages[:i+1])`` stops agreeing with the whole rendering. Inside that region the
    supervised part is the content up to and including the first special token after it (the turn
    terminator). Templates that rewrite earlier turns (e.g. drop reasoning from past turns) break
    the prefix property; then the content is searched for in the rendering instead.
    """

    name = "auto"

    def __init__(self, tokenizer, system_prompt: str | None = None):
        super().__init__(tokenizer, system_prompt)
        specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
        for tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
            if getattr(tok, "special", False):
                specials.add(str(tok))
        self._specials = sorted((s for s in specials if s), key=len, reverse=True)
        self._stops: list[str] | None = None

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja raise_exception(...) or a template bug: a record problem
            raise DataError(None, None, f"the tokenizer's chat_template failed on this conversation: {e}",
                            "template_error") from None

    def _terminator_end(self, text: str, start: int, end: int, content: str) -> tuple[int, str | None]:
        """End of the supervised part of a turn whose content starts at ``start``: through the
        first special token after the content, or ``end`` when there is none."""
        c = content.strip()
        k = text.find(c, start, end) if c else -1
        after = k + len(c) if k >= 0 else start
        best, best_tok = None, None
        for s in self._specials:
            j = text.find(s, after, end)
            if j >= 0 and (best is None or j < best):
                best, best_tok = j, s
        return (best + len(best_tok), best_tok) if best is not None else (end, None)

    def render_spans(self, messages, add_generation_prompt=False):
        full = self._render(messages, add_generation_prompt)
        spans: list[Span] = []
        pos = 0
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            try:  # some templates refuse a prefix (e.g. one that must end with an assistant turn)
                pre = self._render(messages[:i], True) if i else None
            except DataError:
                pre = None
            if pre is not None and full.startswith(pre) and len(pre) >= pos:
                start = len(pre)
                if i + 1 == len(messages) and not add_generation_prompt:
                    end = len(full)  # messages[: i + 1] is the whole conversation: its rendering is ``full``
                else:
                    end = _common_prefix(self._render(messages[: i + 1], False), full)
                end = max(end, start)
            else:
                c = msg["content"].strip()
                start = full.find(c, pos) if c else -1
                if start < 0:
                    raise DataError(None, None, f"cannot find assistant turn {i} in the tokenizer's chat_template "
                                    "rendering; set data.template to a built-in template (chatml, llama3, "
                                    "internlm2, phi3)", "template_error")
                end = len(full)
            stop, _ = self._terminator_end(full, start, end, msg["content"])
            spans.append((start, stop))
            pos = stop
        return full, spans

    def stop_strings(self):
        if self._stops is None:
            probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
            try:
                full = self._render(self.with_system(probe), False)
                k = full.rfind("Hello")
                _, tok = self._terminator_end(full, k, len(full), "Hello") if k >= 0 else (None, None)
            except DataError:
                tok = None
            self._stops = [tok] if tok else []
        return self._stops

    def describe(self):
        tok = self.tokenizer
        return f"{tok.chat_template}|{tok.bos_token}|{tok.eos_token}"


# ---------------------------------------------------------------------------------------------
# Registry and lookup


def _builtin_builder(spec: TemplateSpec):
    def build(tokenizer, system_prompt: str | None = None) -> ChatTemplate:
        check_special_tokens(spec, tokenizer)
        return BuiltinTemplate(spec, tokenizer, system_prompt)

    return build


TEMPLATES: Registry = Registry("chat template")
for _name, _spec_ in BUILTIN_SPECS.items():
    TEMPLATES.register(_name)(_builtin_builder(_spec_))


@TEMPLATES.register("auto")
def _auto(tokenizer, system_prompt=None) -> ChatTemplate:
    if getattr(tokenizer, "chat_template", None):
        return TokenizerTemplate(tokenizer, system_prompt)
    return TEMPLATES.get("chatml")(tokenizer, system_prompt)


def missing_special_tokens(name: str, tokenizer) -> list[str]:
    """Special tokens built-in template ``name`` needs that ``tokenizer`` does not encode as one token."""
    spec = BUILTIN_SPECS.get(name)
    if spec is None:
        return []
    return [t for t in spec.required_tokens if single_token_id(tokenizer, t) is None]


def check_special_tokens(spec: TemplateSpec, tokenizer) -> None:
    missing = missing_special_tokens(spec.name, tokenizer)
    if missing:
        raise ConfigError(
            f"data.template '{spec.name}' needs the special tokens {', '.join(missing)}, which this tokenizer "
            "does not have. Use data.template: auto (the tokenizer's own chat template), a template matching "
            "the model, or add the tokens with mmtune.data.templates.add_template_tokens and resize the model's "
            "embeddings.")


def add_template_tokens(name: str, tokenizer) -> int:
    """Add the special tokens built-in template ``name`` needs to ``tokenizer``; returns how many were
    added (the caller must then ``model.resize_token_embeddings(len(tokenizer))``)."""
    missing = missing_special_tokens(name, tokenizer)
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return len(missing)


def get_template(name: str, tokenizer, system_prompt: str | None = None) -> ChatTemplate:
    """The chat template ``name`` (``auto`` or a built-in) bound to ``tokenizer``.

    Raises ConfigError for an unknown name (listing the valid ones) or, for a built-in, when the
    tokenizer lacks the template's special tokens.
    """
    return TEMPLATES.get(name)(tokenizer, system_prompt)
