"""The base of every recipe section: a strict pydantic model (unknown keys are errors, and so
are bad values assigned later). Its own module so feature sections (encoders/config.py,
multimodal/config.py, continual/config.py) and :mod:`mmtune.config` build on it without importing
each other in a circle."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def explicitly_set(section: BaseModel, name: str) -> bool:
    """Whether the recipe (or an override) set ``name`` in ``section``, default or not."""
    return name in section.model_fields_set
