"""``mmtune data check FILE_OR_RECIPE``: read every record, count the bad ones per reason.

For CI: every source of the recipe (train and eval; each stage's sources for a multimodal recipe)
is read to the end, whatever ``max_records`` and ``on_bad_record`` say, and every record goes
through exactly what training does with it: parsing, the record format, the chat template and
tokenizer, the length policy (and, for multimodal records, loading and tiling every image and
clip). Nothing is cached or written. The report gives, per source, the records read, how many
are usable and the bad ones per reason with the first message for each; the command exits 1 when
any record is bad (``--allow-bad`` to report only).

Records that the length policy drops without being bad (cut by ``data.truncation`` with nothing
supervised left) are reported apart and do not fail the check.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DataError, MMTuneError
from ..multimodal.data import (
    LengthPolicy,
    MediaCache,
    builtin_source,
    encode_mm_sample,
    encode_records,
    normalize_mm_record,
)
from ..multimodal.model import build_composed_model
from ..multimodal.preference import encode_mm_pair
from .formats import detect_format, normalize
from .preference import encode_pair, parse_pair
from .sources import BadRecordStats, iter_raw, locate
from .templates import get_template
from .tokenize import TRUNCATED_EMPTY, EncodeSettings, _encode_all, effective_loss_on

#: Objectives whose data ``check`` reads (encoder objectives read their own corpus formats).
TEXT_OBJECTIVES = ("sft", "pretrain", "dpo")


@dataclass
class SourceCheck:
    """What one source held."""

    path: str
    role: str  # "train", "eval", or "stage NAME" / "stage NAME eval"
    records: int = 0
    ok: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # length-policy drops, not bad records
    bad: BadRecordStats = field(default_factory=BadRecordStats)

    def line(self) -> str:
        out = f"{self.role} {self.path}: {self.records} records, {self.ok} ok"
        if self.bad.total:
            out += f", {self.bad.total} bad ({_counts(self.bad.counts)})"
        if self.dropped:
            out += f", {sum(self.dropped.values())} dropped by the length policy ({_counts(self.dropped)})"
        return out


@dataclass
class CheckReport:
    sources: list[SourceCheck] = field(default_factory=list)
    header: str = ""

    @property
    def records(self) -> int:
        return sum(s.records for s in self.sources)

    @property
    def bad(self) -> BadRecordStats:
        total = BadRecordStats()
        for s in self.sources:
            total.merge(s.bad)
        return total

    def lines(self) -> list[str]:
        out = [self.header] if self.header else []
        for s in self.sources:
            out.append("  " + s.line())
            out += [f"    e.g. {m}" for m in s.bad.examples()]
        bad = self.bad
        if bad.total:
            out.append(f"bad records: {bad.total} of {self.records} ({_counts(bad.counts)})")
        else:
            out.append(f"bad records: none of {self.records}")
        return out


def _counts(counts) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _raw_records(path: str, seed: int, check: SourceCheck) -> Iterator[tuple[int | None, object]]:
    """``(line, raw)`` of the readable records of ``path``; unreadable lines are counted as bad, and a
    file that cannot be read at all is one bad entry (its own reason) instead of an exception."""
    try:
        for line, raw, err in iter_raw(path, seed):
            check.records += 1
            if err is not None:
                check.bad.add(err)
                continue
            yield line, raw
    except DataError as e:  # a whole-file problem (a broken JSON array), named by file and line
        check.records += 1
        check.bad.add(e)
    except MMTuneError as e:  # a missing file, an unsupported type
        check.records += 1
        check.bad.add(DataError(path, None, str(e), "unreadable_source"))


def _check_text_source(src, role: str, template, settings: EncodeSettings, num_proc: int, seed: int,
                       progress: bool) -> SourceCheck:
    check = SourceCheck(src.path, role)
    fmt, samples, where = src.format, [], []
    for line, raw in _raw_records(src.path, seed, check):
        try:
            if fmt == "auto" and isinstance(raw, dict):
                fmt = detect_format(raw, src.text_field)  # the first record fixes the format, as in training
            samples.append(normalize(raw, fmt, src.text_field))
            where.append(line)
        except DataError as e:
            check.bad.add(locate(e, src.path, line))
    for line, res in zip(where, _encode_all(samples, template, settings, num_proc, progress)):
        if res[0] == "ok":
            check.ok += 1
        elif res[0] == "drop":
            check.dropped[TRUNCATED_EMPTY] = check.dropped.get(TRUNCATED_EMPTY, 0) + 1
        else:
            check.bad.add(DataError(src.path, line, res[2], res[1], res[3]))
    return check


def _check_pair_source(src, role: str, template, max_length: int, seed: int) -> SourceCheck:

    check = SourceCheck(src.path, role)
    for line, raw in _raw_records(src.path, seed, check):
        try:
            prompt, chosen, rejected = parse_pair(raw)
            encode_pair(template, prompt, chosen, rejected, max_length)
            check.ok += 1
        except DataError as e:
            check.bad.add(locate(e, src.path, line))
    return check


def check_data(recipe, tokenizer, progress: bool = False) -> CheckReport:
    """Every record of the text ``recipe``'s sources (train and eval) through parsing, format,
    template, tokenizer and length policy; see the module docstring."""
    if recipe.multimodal is not None:
        return check_multimodal_data(recipe)
    if recipe.objective not in TEXT_OBJECTIVES:
        raise ConfigError(f"mmtune data check reads the data of {', '.join(TEXT_OBJECTIVES)} and multimodal "
                          f"recipes; objective '{recipe.objective}' reads its corpus when training")
    data = recipe.data
    if not data.sources:
        raise ConfigError("data.sources is empty: nothing to check")
    template = get_template(data.template, tokenizer, system_prompt=data.system_prompt)
    settings = EncodeSettings.from_config(data, effective_loss_on(recipe.objective, data.loss_on))
    report = CheckReport(header=f"check: every record, template {template.name}, max_length {data.max_length}"
                         f"{', truncation on' if data.truncation else ''}")
    seed = recipe.train.seed
    for role, sources in (("train", data.sources), ("eval", data.eval_sources)):
        for src in sources:
            if recipe.objective == "dpo":
                report.sources.append(_check_pair_source(src, role, template, data.max_length, seed))
            else:
                report.sources.append(_check_text_source(src, role, template, settings, data.num_proc, seed,
                                                         progress))
    return report


def check_multimodal_data(recipe, cache_root: str | Path | None = None) -> CheckReport:
    """Every record of every stage of a multimodal recipe, media loaded and tiled by the model the
    recipe composes (its processors decide the token counts that the length policy sees)."""

    data, seed = recipe.data, recipe.train.seed
    model = build_composed_model(recipe.multimodal, recipe.model, cache_root, seed=seed)
    template = get_template(data.template, model.tokenizer, system_prompt=data.system_prompt)
    policy = LengthPolicy(data.max_length, data.truncation, effective_loss_on(recipe.objective, data.loss_on))
    cache = MediaCache(model)
    report = CheckReport(header=f"check: every record and every image / clip, template {template.name}, "
                         f"max_length {data.max_length}")
    for stage in recipe.multimodal.stages:
        for role, sources in ((f"stage {stage.name}", stage.sources), (f"stage {stage.name} eval",
                                                                       stage.eval_sources)):
            for src in sources:
                check = SourceCheck(src.path, role)
                path = src.path
                if path.startswith("builtin:"):
                    path = str(builtin_source(path[len("builtin:"):], src.max_records, seed))
                root = Path(src.data_root) if src.data_root else Path(path).parent

                def encode(raw, root=root, fmt=src.format):
                    if recipe.objective == "dpo":
                        return encode_mm_pair(raw, fmt, root, model, template, policy, cache)
                    sample = normalize_mm_record(raw, fmt, root)
                    images = [cache.get(m) for m in sample["images"]]
                    audios = [cache.get(m) for m in sample["audios"]]
                    return encode_mm_sample(sample, images, audios, model, template, policy)

                try:
                    for out in encode_records(path, seed, None, encode, "skip", check.bad):
                        check.records += 1
                        if isinstance(out, str):
                            check.dropped[out] = check.dropped.get(out, 0) + 1
                        elif out is not None:
                            check.ok += 1
                except MMTuneError as e:  # the file itself cannot be read
                    check.records += 1
                    check.bad.add(e if isinstance(e, DataError) else DataError(src.path, None, str(e),
                                                                               "unreadable_source"))
                report.sources.append(check)
    return report
