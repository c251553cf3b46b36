"""``mmtune data inspect RECIPE_OR_FILE``: see exactly what the model will be trained on.

For the first ``n`` records of the first training source it shows the raw record, the parsed
messages, the templated text and the tokens with the supervised ones highlighted (green, or
wrapped in ``[[ ]]`` without colour), followed by the data report of the whole recipe. The
report stops at the first bad record under ``on_bad_record: error`` (as training would);
:attr:`InspectResult.stopped` says so and the command then exits 1.

The target is a recipe (YAML or shipped name) or a data file (``.jsonl`` / ``.ndjson`` /
``.json`` / ``.parquet``, a ``datasets`` directory or a ``builtin:NAME`` source), which
:func:`data_recipe` wraps in a default recipe: the tokenizer of ``--model`` (default
``builtin:tiny``), the template of ``--template`` (default ``auto``), and ``objective: dpo`` when
the first record is a preference pair (``chosen`` + ``rejected``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import apply_overrides, load_recipe, validate_recipe
from ..errors import ConfigError, DataError, MMTuneError
from .formats import detect_format, normalize
from .preference import encode_pair, parse_pair
from .sources import JSONL_SUFFIXES, iter_raw, locate
from .templates import IGNORE, get_template
from .tokenize import EncodeSettings, build_datasets, effective_loss_on, encode_sample

#: Suffixes that make ``mmtune data inspect/check TARGET`` read TARGET as data, not as a recipe.
DATA_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".parquet")
DEFAULT_MODEL = "builtin:tiny"
_MEDIA_KEYS = ("image", "images", "audio", "audios")

GREEN, DIM, BOLD, RESET = "\033[32m", "\033[2m", "\033[1m", "\033[0m"
OPEN, CLOSE = "[[", "]]"  # plain-text marker around supervised tokens
SEP = "\u00a6"  # broken bar between tokens ("|" is part of many special tokens)


def _clip(s: str, limit: int = 800) -> str:
    return s if len(s) <= limit else s[:limit] + f"... ({len(s) - limit} more characters)"


def _indent(s: str, pad: str = "    ") -> str:
    return "\n".join(pad + line for line in s.split("\n"))


def render_tokens(tokenizer, input_ids: list[int], labels: list[int], color: bool = True) -> str:
    """Tokens separated by ``SEP``, supervised runs in green (or between ``[[`` and ``]]``)."""
    out, inside = [], False
    for tid, lab in zip(input_ids, labels):
        piece = tokenizer.decode([tid]).replace("\n", "\\n")
        sup = lab != IGNORE
        if sup != inside:
            if color:
                out.append(GREEN if sup else RESET)
            else:
                out.append(OPEN if sup else CLOSE)
            inside = sup
        out.append(piece + SEP)
    if inside:
        out.append(RESET if color else CLOSE)
    return "".join(out)


def is_data_target(target: str) -> bool:
    """Whether TARGET names data (a file, a datasets directory, ``builtin:NAME``) rather than a recipe."""
    if target.startswith("builtin:"):
        return True
    p = Path(target)
    if p.suffix.lower() in DATA_SUFFIXES:
        return True
    return p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _first_record(path: str):
    """The first readable record (it decides the objective), or None; a file that cannot be read
    is reported by the command that reads it."""
    try:
        for _line, raw, err in iter_raw(path):
            if err is None:
                return raw
    except MMTuneError:
        pass
    return None


def data_recipe(path: str, overrides: list[str] | None = None, model: str | None = None,
                template: str | None = None):
    """A default recipe that reads the data file ``path`` (see the module docstring); nothing cached."""

    first = _first_record(path)
    if isinstance(first, dict) and any(k in first for k in _MEDIA_KEYS):
        raise ConfigError(f"{path} holds image/audio records; they need the model's processors: check them "
                          "through their multimodal recipe (mmtune data check RECIPE)")
    data = {"model": {"path": model or DEFAULT_MODEL},
            "data": {"sources": [{"path": path}], "template": template or "auto", "cache_dir": None}}
    if isinstance(first, dict) and "chosen" in first and "rejected" in first:
        data["objective"] = "dpo"
    return validate_recipe(apply_overrides(data, overrides or []), f"<defaults for {path}>")


def load_target(target: str, overrides: list[str] | None = None, model: str | None = None,
                template: str | None = None):
    """The recipe of ``mmtune data inspect/check TARGET``: TARGET's own, or :func:`data_recipe`'s;
    ``model`` / ``template`` replace the recipe's ``model.path`` / ``data.template``."""

    if is_data_target(target):
        return data_recipe(target, overrides, model, template)
    extra = [f"model.path={model}"] * bool(model) + [f"data.template={template}"] * bool(template)
    try:
        return load_recipe(target, [*(overrides or []), *extra])
    except UnicodeDecodeError:
        raise ConfigError(f"{target}: not UTF-8 text, so not a recipe; a data file needs one of the suffixes "
                          f"{', '.join(DATA_SUFFIXES)}") from None


@dataclass
class InspectResult:
    """What :func:`inspect_result` shows; ``stopped`` is the error the data report stopped on."""

    text: str
    stopped: MMTuneError | None = None


def _dump(raw) -> str:
    try:
        return json.dumps(raw, ensure_ascii=False, indent=1, default=str)
    except RecursionError:
        return "(nested too deeply to show)"


def _pair_lines(raw, path: str, line, template, max_length: int, tokenizer, color: bool) -> list[str]:
    """A preference record: the prompt turns, then each side's tokens (the response supervised)."""

    try:
        prompt, chosen, rejected = parse_pair(raw)
        enc = encode_pair(template, prompt, chosen, rejected, max_length)
    except DataError as e:
        return [f"  bad record: {locate(e, path, line)}"]
    out = ["  parsed (preference pair):"]
    out += [_indent(_clip(f"[{m['role']}] {m['content']}"), "    ") for m in template.with_system(prompt)]
    for side in ("chosen", "rejected"):
        ids, labels = enc[f"{side}_ids"], enc[f"{side}_labels"]
        out.append(f"  {side} tokens ({len(ids)}, {sum(1 for x in labels if x != IGNORE)} supervised):")
        out.append(_indent(render_tokens(tokenizer, ids, labels, color)))
    return out


def inspect_data(recipe, tokenizer, n: int = 3, color: bool = True) -> str:
    """A readable dump of the first ``n`` records of ``recipe.data.sources[0]`` and the data report."""
    return inspect_result(recipe, tokenizer, n, color).text


def inspect_result(recipe, tokenizer, n: int = 3, color: bool = True) -> InspectResult:
    """:func:`inspect_data` with the error the data report stopped on (None when it completed)."""
    data = recipe.data
    b = (lambda s: f"{BOLD}{s}{RESET}") if color else (lambda s: s)
    template = get_template(data.template, tokenizer, system_prompt=data.system_prompt)
    loss_on = effective_loss_on(recipe.objective, data.loss_on)
    settings = EncodeSettings.from_config(data, loss_on)
    legend = "green" if color else f"between {OPEN} and {CLOSE}"
    lines = [b(f"template: {template.name}; loss on: {loss_on}; supervised tokens are {legend}; tokens are "
               f"separated by {SEP}; stop tokens: {template.stop_token_ids}")]
    if not data.sources:
        raise MMTuneError("data.sources is empty: nothing to inspect")
    src = data.sources[0]
    fmt = src.format
    shown = 0
    for line, raw, err in iter_raw(src.path, recipe.train.seed):
        if shown >= n:
            break
        shown += 1
        lines.append("")
        lines.append(b(f"== record {shown}: {src.path}:{line} =="))
        if err is not None:
            lines.append(f"  bad record: {err}")
            continue
        lines.append("  raw:")
        lines.append(_indent(_clip(_dump(raw))))
        if recipe.objective == "dpo":
            lines += _pair_lines(raw, src.path, line, template, data.max_length, tokenizer, color)
            continue
        try:
            if fmt == "auto" and isinstance(raw, dict):
                fmt = detect_format(raw, src.text_field)
            sample = normalize(raw, fmt, src.text_field)
        except DataError as e:
            lines.append(f"  bad record: {locate(e, src.path, line)}")
            continue
        lines.append(f"  parsed ({fmt}):")
        if "messages" in sample:
            for m in template.with_system(sample["messages"]):
                lines.append(_indent(_clip(f"[{m['role']}] {m['content']}"), "    "))
            lines.append("  templated text:")
            lines.append(_indent(_clip(template.render(sample["messages"]), 2000)))
        else:
            lines.append(_indent(_clip(sample["text"])))
        try:
            ids, labels, truncated = encode_sample(sample, template, settings)
        except DataError as e:
            lines.append(f"  bad record: {locate(e, src.path, line)}")
            continue
        if not ids:
            lines.append(f"  dropped: cut to max_length {data.max_length} it has no supervised token left")
            continue
        n_sup = sum(1 for x in labels if x != IGNORE)
        lines.append(f"  tokens ({len(ids)}, {n_sup} supervised{', truncated' if truncated else ''}):")
        lines.append(_indent(render_tokens(tokenizer, ids, labels, color)))
    lines.append("")
    lines.append(b("== report =="))
    stopped = None
    try:
        if recipe.objective == "dpo":
            from .preference import build_preference_datasets

            lines += build_preference_datasets(data, template, recipe.train.seed)[2].lines()
        else:
            lines += build_datasets(data, tokenizer, recipe.objective, recipe.train.seed, progress=False)[2].lines()
    except MMTuneError as e:
        stopped = e
        lines.append(f"  stopped: {e}")
    return InspectResult("\n".join(lines), stopped)
