"""Modality groups of a sample and the media placeholder tags in its text: what the data layer
needs to batch samples per group, without the composed model (whose router routes the groups).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import MMTuneError

IMAGE_TAG = "<image>"
AUDIO_TAG = "<audio>"
GROUPS = ("text", "image", "audio", "image+audio")


def group_of(n_images: int, n_audios: int) -> str:
    """The modality group of a sample with ``n_images`` images and ``n_audios`` audio clips."""
    if n_images and n_audios:
        return "image+audio"
    if n_images:
        return "image"
    if n_audios:
        return "audio"
    return "text"


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
