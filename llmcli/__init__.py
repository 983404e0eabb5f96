"""llmcli: the transformer inference pipeline as Unix filters."""

__version__ = "0.1.0"
