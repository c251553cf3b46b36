"""The vocabulary of a conversation with a model: turns (text with image and audio
attachments), generation settings, a rendered prompt, and the error for a conversation a model
cannot take as given."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MMTuneError

#: File suffixes uploads are sorted by (the OpenAI server gets explicit content-part types).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".webm")

#: The encoder a model needs for each input modality (used in error messages and notes).
ENCODER_NAMES = {"image": "vision encoder", "audio": "audio encoder"}

#: Label of the route when no adapter is active.
BASE_MODEL = "base model"


@dataclass
class Turn:
    """One message of a conversation. ``images`` / ``audios`` are local file paths, or
    :class:`mmtune.multimodal.data.Media` (inline bytes, as the server receives them)."""

    role: str  # system | user | assistant
    text: str = ""
    images: list = field(default_factory=list)
    audios: list = field(default_factory=list)

    def as_message(self) -> dict:
        """The ``{"role", "content"}`` dict chat templates take (text only)."""
        return {"role": self.role, "content": self.text}


def media_name(item) -> str:
    """A short name of an attachment for messages: the file name, or "inline image"."""
    path = getattr(item, "path", item)
    if path is None:
        return f"inline {getattr(item, 'kind', 'data')}"
    return Path(str(path)).name


@dataclass
class GenerationSettings:
    """Sampling settings of one reply (see :func:`mmtune.inference.generate.iter_token_ids`)."""

    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the reply ends before the first occurrence of any of these
    top_k: int = 0  # 0 = no top-k filtering


@dataclass
class Prompt:
    """A conversation rendered for one model: its token ids, the adapter that will answer, and
    the processed images and clips (in prompt order) a composed model needs."""

    ids: list[int]
    route: str = BASE_MODEL
    images: list = field(default_factory=list)
    audios: list = field(default_factory=list)
    group: str = "text"  # the modality group of the media (mmtune.multimodal.groups)


class InputError(MMTuneError):
    """A conversation a model cannot serve as given (too long, an unsupported modality, an
    unreadable attachment).

    ``param`` names the offending request field and ``code`` is a stable key; the OpenAI
    server returns both in its error JSON.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def split_attachments(paths) -> tuple[list[str], list[str], list[str]]:
    """Sort uploaded files by suffix into (images, audios, others)."""
    images, audios, others = [], [], []
    for p in paths:
        suffix = Path(p).suffix.lower()
        (images if suffix in IMAGE_SUFFIXES else audios if suffix in AUDIO_SUFFIXES else others).append(p)
    return images, audios, others
