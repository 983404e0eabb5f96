"""One file per architecture family; `family_module` picks the one a config needs."""

from __future__ import annotations

from types import ModuleType

from llmcli.core.config import ModelConfig, family_of


def family_module(config: ModelConfig) -> ModuleType:
    return family_of(config.model_type)
