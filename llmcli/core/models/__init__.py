"""One file per architecture family; `family_module` picks the one a config needs."""

from __future__ import annotations

import importlib
from types import ModuleType

from llmcli.core.config import ModelConfig


def family_module(config: ModelConfig) -> ModuleType:
    return importlib.import_module(f"llmcli.core.models.{config.family}")
