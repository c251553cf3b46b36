"""The base of every recipe section: a strict pydantic model (unknown keys are errors, and so
are bad values assigned later). Its own module so feature sections (encoders/config.py,
multimodal/config.py, continual/config.py) and :mod:`mmtune.config` build on it without importing
each other in a circle."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def explicitly_set(section: BaseModel, name: str) -> bool:
    """Whether the recipe (or an override) set ``name`` in ``section`` to something other than its
    default. A default written out (a saved ``recipe.yaml`` holds every field) counts as unset:
    ignoring it changes nothing."""
    if name not in section.model_fields_set:
        return False
    default = type(section).model_fields[name].get_default(call_default_factory=True)
    return getattr(section, name) != default
