"""``mmtune data inspect RECIPE``: see exactly what the model will be trained on.

For the first ``n`` records of the first training source it shows the raw record, the parsed
messages, the templated text and the tokens with the supervised ones highlighted (green, or
wrapped in ``[[ ]]`` without colour), followed by the data report of the whole recipe.
"""

from __future__ import annotations

import json

from ..errors import DataError, MMTuneError
from .formats import detect_format, normalize
from .sources import iter_raw, locate
from .templates import IGNORE, get_template
from .tokenize import EncodeSettings, build_datasets, effective_loss_on, encode_sample

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


def inspect_data(recipe, tokenizer, n: int = 3, color: bool = True) -> str:
    """A readable dump of the first ``n`` records of ``recipe.data.sources[0]`` and the data report."""
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
        lines.append(_indent(_clip(json.dumps(raw, ensure_ascii=False, indent=1, default=str))))
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
    try:
        _, _, report = build_datasets(data, tokenizer, recipe.objective, recipe.train.seed, progress=False)
        lines += report.lines()
    except MMTuneError as e:
        lines.append(f"  stopped: {e}")
    return "\n".join(lines)
