"""Modality groups of a sample and the media placeholder tags in its text: what the data layer
needs to batch samples per group, without the composed model (whose router routes the groups).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

from ..errors import MMTuneError

IMAGE_TAG = "<image>"
AUDIO_TAG = "<audio>"
GROUPS = ("text", "image", "audio", "image+audio")  # the groups of a model with both built-in modalities


def modality_groups(modalities: Sequence[str]) -> tuple[str, ...]:
    """The routing groups of a model with ``modalities`` (in their order): ``text``, then every
    non-empty combination, smaller first, named by joining with ``+``. For ``(image, audio)``
    that is :data:`GROUPS`."""
    out = ["text"]
    for k in range(1, len(modalities) + 1):
        out += ["+".join(c) for c in combinations(modalities, k)]
    return tuple(out)


def group_name(counts: Mapping[str, int], order: Sequence[str]) -> str:
    """The group of a sample holding ``counts[m]`` items of each modality ``m`` of ``order``."""
    unknown = [m for m, n in counts.items() if n and m not in order]
    if unknown:
        raise MMTuneError(f"sample has {', '.join(unknown)} media but the model's modalities are "
                          f"{', '.join(order) or 'none'}")
    return "+".join(m for m in order if counts.get(m)) or "text"


def group_of(n_images: int, n_audios: int) -> str:
    """The modality group of a sample with ``n_images`` images and ``n_audios`` audio clips."""
    return group_name({"image": n_images, "audio": n_audios}, ("image", "audio"))


def split_by_group(groups: Sequence[str]) -> dict[str, list[int]]:
    """Indices of ``groups`` per modality group, in first-seen order of the groups, each list in
    the original order: one sub-batch per group, samples keep their order (so the features
    attached to them stay aligned)."""
    out: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if g not in GROUPS:
            raise MMTuneError(f"sample {i} has unknown modality group '{g}'; groups: {', '.join(GROUPS)}")
        out.setdefault(g, []).append(i)
    return out
