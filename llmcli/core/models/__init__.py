"""One file per architecture family; `family_module` picks the one a config needs (models/registry.py)."""

from __future__ import annotations

from types import ModuleType


def family_module(config) -> ModuleType:
    from llmcli.core.models.registry import family_of

    return family_of(config.model_type)
